"""User datasets through TRL's SFT data path, for the trainer and the teacher cache alike.

Distillation reads the same datasets as supervised fine-tuning: language modeling (``text``),
conversational (``messages``), prompt-completion (plain or conversational) and pre-tokenized
(``input_ids``, optionally with ``completion_mask`` / ``assistant_masks``). TRL already turns each of
them into ``input_ids`` + ``labels`` (-100 on tokens outside the loss) with optional packing; this
module calls that code instead of keeping a second pipeline, so the teacher cache stores exactly the
rows the trainer would train on.

The alignment rule shared by the trainer, the loss and the cache: the teacher signal of a collated
batch has one row per *labelled position*, the entries of :func:`next_token_labels` that are not
-100, in that order (position t predicts the token at t + 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100
TEACHER_KEY_PREFIX = "teacher_"
TOKENIZED_COLUMN = "input_ids"


class DatasetFormatError(ValueError):
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


def _first_example(dataset: Any) -> Mapping[str, Any]:
    try:
        return next(iter(dataset))
    except StopIteration:
        raise DatasetFormatError("the dataset is empty: there is nothing to train on or cache.") from None


def _columns(dataset: Any, formatting_func: Callable[[dict], str] | None) -> list[str]:
    """The dataset's columns as TRL's preparation sees them: a ``formatting_func`` adds ``text``."""
    from trl.data_utils import get_dataset_column_names

    columns = list(get_dataset_column_names(dataset))
    return columns + ["text"] if formatting_func is not None and "text" not in columns else columns


def _is_chat(example: Mapping[str, Any]) -> bool:
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

    kind = dataset_format(_columns(dataset, formatting_func), args)
    example = _first_example(dataset)
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
    conversational = _is_chat(example)
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
            f"the dataset holds chat messages but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
            "template: set tokenizer.chat_template (or SFTConfig.chat_template_path to a .jinja file), use an "
            "instruct model's tokenizer, or give the documents as a text column."
        )
    return template


def completion_only(args: Any, prompt_completion: bool) -> bool:
    """Whether the loss skips prompts, as SFTTrainer decides: ``completion_only_loss``, or when None,
    whether the rows are prompt-completion."""
    return prompt_completion if args.completion_only_loss is None else bool(args.completion_only_loss)


@dataclass
class _PreparationState:
    """The three attributes TRL's ``SFTTrainer._prepare_dataset`` reads from its trainer."""

    _tokenizer: Any
    completion_only_loss: bool
    chat_template: str | None


def _preparation_state(example: Mapping[str, Any], processing_class: Any, args: Any) -> _PreparationState:
    """The same decisions ``SFTTrainer.__init__`` makes before it prepares a dataset."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    completion_only_loss = completion_only(args, "prompt" in example and "completion" in example)
    chat_template = None
    if args.assistant_only_loss and not has_generation_markers(processing_class.chat_template):
        chat_template = get_training_chat_template(processing_class)
    return _PreparationState(processing_class, completion_only_loss, chat_template)


def prepare_dataset(
    dataset: Any,
    processing_class: Any,
    args: Any,
    *,
    formatting_func: Callable[[dict], str] | None = None,
    dataset_name: str = "train",
) -> Any:
    """Rows of ``input_ids`` and ``labels`` (plus ``seq_lengths`` when packed), exactly as ``trl.SFTTrainer``
    would train on them with the same ``args`` (a ``trl.SFTConfig``, e.g. a DistillationConfig).

    Pre-tokenized datasets keep their rows; ``labels`` are added (a copy of ``input_ids``, or masked by a
    ``completion_mask`` / ``assistant_masks`` column) unless present.
    """
    from trl import SFTTrainer

    check_dataset(dataset, processing_class, args, formatting_func=formatting_func)
    if args.eos_token is not None and processing_class is not None:
        processing_class.eos_token = args.eos_token  # as SFTTrainer does before preparing
    state = _preparation_state(_first_example(dataset), processing_class, args)
    return SFTTrainer._prepare_dataset(
        state, dataset, processing_class, args, args.packing, formatting_func, dataset_name
    )


PREPARATION_ARGUMENTS = (
    "max_length",
    "truncation_mode",
    "packing",
    "packing_strategy",
    "padding_free",
    "completion_only_loss",
    "assistant_only_loss",
    "dataset_text_field",
    "eos_token",
)
"""The SFTConfig fields that shape the prepared rows and their collation (with ``shuffle_dataset`` and
its ``seed``); ``hf-capgap cache build`` takes them as flags."""
_FACTS = ("dataset_format", "longest_row")
"""Entries of a preparation record that describe the rows rather than a setting."""


def _setting(args: Any, field: str, kind: str) -> Any:
    """The value of one preparation setting of ``args`` as it acts on rows of format ``kind``."""
    if field == "padding_free":
        return uses_padding_free(args)
    if field == "completion_only_loss":
        return completion_only(args, kind == "prompt_completion")
    value = getattr(args, field)
    return bool(value) if field in ("packing", "assistant_only_loss", "shuffle_dataset") else value


def preparation_settings(
    dataset: Any, prepared: Any, args: Any, *, formatting_func: Callable[[dict], str] | None = None
) -> dict[str, Any]:
    """What the rows ``prepared`` from ``dataset`` with ``args`` depend on: the rows' format, their
    longest row, and each setting the format reads (padding_free aside, a collation setting).

    Settings the format never reads are left out (``dataset_text_field`` of chat rows, the assistant
    mask of tokenized rows, truncation when no row reached ``max_length`` ...), so a config that
    differs only there is not told it disagrees.
    """
    import pyarrow.compute as pc

    columns = _columns(dataset, formatting_func)
    kind = dataset_format(columns, args)
    longest = pc.max(pc.list_value_length(prepared.with_format("arrow")[:][TOKENIZED_COLUMN])).as_py()
    fields = ["max_length", "packing", "shuffle_dataset"]
    if args.packing:
        fields.append("packing_strategy")
    elif args.max_length is not None and longest >= args.max_length:
        fields.append("truncation_mode")  # some rows may have been cut
    if args.shuffle_dataset:
        fields.append("seed")
    if kind == "prompt_completion" or ("completion_mask" in columns and "labels" not in columns):
        fields.append("completion_only_loss")
    if kind != "tokenized":
        fields.append("assistant_only_loss")
        if not _is_chat(_first_example(dataset)):
            fields.append("eos_token")  # appended to plain text only
    if kind == "language_modeling":
        fields.append("dataset_text_field")
    return {"dataset_format": kind, "longest_row": longest, **{field: _setting(args, field, kind) for field in fields}}


def preparation_disagreements(recorded: Mapping[str, Any], args: Any) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, value in ``args``) for each setting under which ``args`` would give
    other rows than those :func:`preparation_settings` recorded.

    Unpacked rows none of which reached either ``max_length`` were never cut, so both give them.
    """
    kind = recorded.get("dataset_format")
    found = []
    for field, have in recorded.items():
        if field in _FACTS:
            continue
        want = _setting(args, field, kind)
        uncut = (
            field == "max_length" and not recorded["packing"] and None not in (have, want)
            and recorded["longest_row"] < have and recorded["longest_row"] <= want
        )  # fmt: skip
        if want != have and not uncut:
            found.append((field, have, want))
    return found


def make_collator(processing_class: Any, args: Any = None) -> Any:
    """TRL's language-modeling collator as ``SFTTrainer`` configures it for ``args``.

    Padding-free (one concatenated row with ``position_ids``, labels masked at each document start) when
    ``args.padding_free`` is set or packing uses best-fit decreasing, so packed documents never attend
    to each other; otherwise (and without ``args``) right-padded rows with an attention mask.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    pad_id = getattr(processing_class, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(processing_class, "eos_token_id", None)
    return DataCollatorForLanguageModeling(
        pad_token_id=0 if pad_id is None else pad_id,
        padding_free=args is not None and uses_padding_free(args),
        pad_to_multiple_of=None if args is None else args.pad_to_multiple_of,
    )


def uses_padding_free(args: Any) -> bool:
    """Whether batches are flattened into one row (TRL: padding_free, or bfd packing)."""
    return bool(args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"}))


def forward_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What a causal LM's forward gets from a collated batch: everything but the labels and the
    cached teacher signal (``position_ids``, ``cu_seq_lens_*`` ... of padding-free batches included)."""
    return {
        key: value
        for key, value in batch.items()
        if key != "labels" and not key.startswith(TEACHER_KEY_PREFIX)
    }


def next_token_labels(labels: Tensor) -> Tensor:
    """What each position of a [batch, length] batch predicts, flattened to batch * length entries.

    Each row's last position predicts nothing (-100), so the model's own [batch, length, ...] outputs
    are used as they are (a view) instead of a shifted copy of the [tokens, vocab] logits.
    """
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def count_labelled_positions(labels: Tensor) -> int:
    """Positions that count in the loss (the rows a cached teacher signal holds)."""
    return int((next_token_labels(labels) != IGNORE_INDEX).sum())


def rows_holding_positions(dataset: Any, positions: int, batch_rows: int = 1024) -> int:
    """The fewest leading rows of a prepared map-style dataset whose labelled positions number at
    least ``positions``; all rows when they hold fewer."""
    import numpy as np

    seen = rows = 0
    for per_row in _labelled_positions_per_row(dataset, batch_rows):
        reached = np.flatnonzero(seen + np.cumsum(per_row) >= positions)
        if len(reached):
            return rows + int(reached[0]) + 1
        seen, rows = seen + int(per_row.sum()), rows + len(per_row)
    return rows


def has_labelled_position(dataset: Any, batch_rows: int = 1024) -> bool:
    """Whether any row of a prepared map-style dataset has a token to predict (a label past position 0).

    Reads batch by batch and stops at the first labelled token, so a large dataset costs one batch.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return True  # a stream is not read ahead; its batches are counted as they come
    return any(per_row.any() for per_row in _labelled_positions_per_row(dataset, batch_rows))


def _labelled_positions_per_row(dataset: Any, batch_rows: int) -> Iterator[Any]:
    """Each row's labelled positions (labels past position 0 that are not -100; every position past
    the first without a labels column), as one numpy array per batch of ``batch_rows`` rows."""
    import numpy as np
    import pyarrow.compute as pc

    column = "labels" if "labels" in dataset.column_names else TOKENIZED_COLUMN
    for batch in dataset.with_format("arrow").iter(batch_size=batch_rows):
        following = pc.list_slice(batch[column], 1)
        flat = pc.list_flatten(following)
        labelled = np.ones(len(flat)) if column == TOKENIZED_COLUMN else np.asarray(pc.not_equal(flat, IGNORE_INDEX))
        parents = np.asarray(pc.list_parent_indices(following))
        yield np.bincount(parents, weights=labelled, minlength=len(following))
