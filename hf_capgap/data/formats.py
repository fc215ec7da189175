"""Which SFT format a dataset holds, and the checks TRL makes of it and of the data settings, run before
any model does: the trainer and the teacher cache refuse what ``trl.SFTTrainer`` would refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hf_capgap.errors import ConfigError, HfCapgapError

IGNORE_INDEX = -100
TOKENIZED_COLUMN = "input_ids"


class DatasetFormatError(HfCapgapError, ValueError):
    """A dataset, tokenizer or setting that TRL's SFT data path cannot turn into training rows."""


def dataset_format(columns: list[str], args: Any) -> str:
    """Which SFT format the columns hold: 'tokenized', 'prompt_completion', 'conversational' or 'language_modeling'.

    Raises :class:`DatasetFormatError` naming the columns and the fix when none applies.
    """
    if TOKENIZED_COLUMN in columns:
        return "tokenized"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "messages" in columns or "conversations" in columns:
        return "conversational"
    if args.dataset_text_field in columns:
        return "language_modeling"
    raise DatasetFormatError(
        f"the dataset has columns {columns}, which match no supported format: a text column named by "
        f"dataset_text_field (now {args.dataset_text_field!r}), 'messages' (chat), 'prompt' + 'completion', or "
        "pre-tokenized 'input_ids'. Rename your column or set dataset_text_field."
    )


def first_example(dataset: Any) -> Mapping[str, Any]:
    try:
        return next(iter(dataset))
    except StopIteration:
        raise DatasetFormatError("the dataset is empty: there is nothing to train on or cache.") from None


def dataset_columns(dataset: Any, formatting_func: Callable[[dict], str] | None) -> list[str]:
    """The dataset's columns as TRL's preparation sees them: a ``formatting_func`` adds ``text``."""
    from trl.data_utils import get_dataset_column_names

    columns = list(get_dataset_column_names(dataset))
    return columns + ["text"] if formatting_func is not None and "text" not in columns else columns


def is_chat(example: Mapping[str, Any]) -> bool:
    from trl.data_utils import is_conversational

    return is_conversational(example) or "conversations" in example


def check_dataset(
    dataset: Any, processing_class: Any, args: Any, *, formatting_func: Callable[[dict], str] | None = None
) -> str:
    """Fail fast, before any model runs, on a dataset TRL would only reject deep inside ``map``.

    Returns the dataset's format (see :func:`dataset_format`); a ``formatting_func`` makes untokenized
    rows language modeling text, as in TRL.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    kind = dataset_format(dataset_columns(dataset, formatting_func), args)
    example = first_example(dataset)
    if formatting_func is not None and completion_only(args, "prompt" in example and "completion" in example):
        raise DatasetFormatError(
            "completion-only loss (completion_only_loss=True, or None on prompt-completion rows) with a "
            "formatting_func: the function turns every row into plain text, so there is no completion to mask "
            "(TRL refuses the pair too). Format the rows before, or set completion_only_loss=False."
        )
    if kind == "tokenized":
        return kind
    if processing_class is None:
        raise DatasetFormatError(
            f"the dataset is {kind.replace('_', ' ')} text, which needs a tokenizer: pass processing_class=<the "
            "student's tokenizer> (the teacher's tokenizer, for a pruned student)."
        )
    conversational = is_chat(example)
    if conversational:
        require_chat_template(processing_class)
    if args.assistant_only_loss:
        if not conversational:
            raise DatasetFormatError(
                "assistant_only_loss=True needs a conversational ('messages') dataset; this one is "
                f"{kind.replace('_', ' ')}. Use completion_only_loss for prompt-completion data, or turn it off."
            )
        if not has_generation_markers(processing_class.chat_template):
            try:
                training_template = get_training_chat_template(processing_class)
            except (ValueError, NotImplementedError) as err:
                training_template, reason = None, str(err)
            else:
                reason = "TRL knows no training variant of it"
            if training_template is None:
                raise DatasetFormatError(
                    "assistant_only_loss=True needs a chat template that marks assistant turns with "
                    "{% generation %} ... {% endgeneration %}, and this tokenizer's template has no such markers "
                    f"({reason}). Add the markers to the template, or set assistant_only_loss=False."
                )
    return kind


def require_chat_template(tokenizer: Any) -> Any:
    """The tokenizer's chat template; raise naming the fix when a chat dataset meets a tokenizer without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DatasetFormatError(
            f"the dataset holds chat messages but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
            "chat template: set tokenizer.chat_template (or SFTConfig.chat_template_path to a .jinja file), use an "
            "instruct model's tokenizer, or give the documents as a text column."
        )
    return template


def completion_only(args: Any, prompt_completion: bool) -> bool:
    """Whether the loss skips prompts, as SFTTrainer decides: ``completion_only_loss``, or when None,
    whether the rows are prompt-completion."""
    return prompt_completion if args.completion_only_loss is None else bool(args.completion_only_loss)


def skips_preparation(args: Any) -> bool:
    """Whether SFTTrainer trains on the rows as given: ``dataset_kwargs={"skip_prepare_dataset": True}``."""
    return bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))


def uses_padding_free(args: Any) -> bool:
    """Whether batches are flattened into one row (TRL: padding_free, or bfd packing)."""
    return bool(args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"}))


def check_sft_config(args: Any, processing_class: Any) -> None:
    """The checks ``SFTTrainer.__init__`` makes of the data settings before it prepares rows, so a cache
    is never built with settings no trainer accepts.

    TRL runs them inline in ``SFTTrainer.__init__`` (trl/trainer/sft_trainer.py: the ``eos_token``
    vocabulary check, and "When `padding_free=True` without packing, `max_length` is not enforced"),
    with no function to call, so they are restated here.
    """
    if args.padding_free and not args.packing and args.max_length is not None:
        raise ConfigError(
            f"padding_free=True without packing does not enforce max_length (now {args.max_length}), so SFTTrainer "
            "refuses it: set max_length=None (hf-capgap cache build --max_length None) and give rows already cut "
            "to length, or enable packing (packing=True, packing_strategy='bfd')."
        )
    if args.eos_token is not None and processing_class is not None:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if args.eos_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"eos_token={args.eos_token!r} is not in the vocabulary of the tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '')!r} (SFTTrainer refuses it too): name one of its tokens, "
                "or leave eos_token=None to use the tokenizer's own."
            )
