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

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hf_capgap.errors import HfCapgapError

IGNORE_INDEX = -100
TEACHER_KEY_PREFIX = "teacher_"
# Each example's token count in an evaluation batch: where a padding-free batch's rows end (trainer metrics).
EXAMPLE_TOKENS_KEY = "example_tokens"
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
    ``completion_mask`` / ``assistant_masks`` column) unless present. With
    ``dataset_kwargs={"skip_prepare_dataset": True}`` the rows are returned as given, as SFTTrainer does.
    """
    return prepare_and_record(dataset, processing_class, args, formatting_func=formatting_func, dataset_name=dataset_name)[0]


def prepare_and_record(
    dataset: Any,
    processing_class: Any,
    args: Any,
    *,
    formatting_func: Callable[[dict], str] | None = None,
    dataset_name: str = "train",
) -> tuple[Any, dict[str, Any]]:
    """:func:`prepare_dataset`'s rows and the record of what they depend on (the rows' format, their
    longest row before truncation, how many rows had no label, and each setting the format reads).

    TRL's preparation runs in two steps, tokenizing (no truncation, packing or shuffle), then the rest on
    the tokenized rows, so the record can say whether ``max_length`` cut or dropped any row: a longer
    ``max_length`` only gives the same rows when none was. Settings the format never reads are left
    out (``dataset_text_field`` of chat rows, ``truncation_mode`` when no row was cut ...), so a config
    that differs only there is not told it disagrees.
    """
    from trl import SFTTrainer

    check_sft_config(args, processing_class)
    if skips_preparation(args):
        return _unprepared_rows(dataset, args), {"dataset_format": "tokenized", "skip_prepare_dataset": True}
    check_dataset(dataset, processing_class, args, formatting_func=formatting_func)
    if processing_class is not None:
        if args.eos_token is not None:
            processing_class.eos_token = args.eos_token  # as SFTTrainer.__init__ does, before the chat template
        apply_chat_template_path(processing_class, args)
    example = _first_example(dataset)
    state = _preparation_state(example, processing_class, args)
    tokenizing = copy.copy(args)
    tokenizing.max_length, tokenizing.shuffle_dataset = None, False
    tokenized = SFTTrainer._prepare_dataset(
        state, dataset, processing_class, tokenizing, False, formatting_func, dataset_name
    )
    longest, unlabelled = _longest_and_unlabelled(tokenized)
    prepared = SFTTrainer._prepare_dataset(state, tokenized, processing_class, args, args.packing, None, dataset_name)
    kind = dataset_format(_columns(dataset, formatting_func), args)
    record = {
        "dataset_format": kind,
        "longest_untruncated_row": longest,
        "unlabelled_rows": unlabelled,
        **_settings_read(dataset, args, kind, longest, formatting_func),
    }
    if processing_class is not None and kind != "tokenized":
        if _is_chat(example):
            record["chat_template_sha256"] = template_digest(processing_class.chat_template)
        else:
            record["eos_token"] = processing_class.eos_token  # the one appended to each text
    return prepared, record


def skips_preparation(args: Any) -> bool:
    """Whether SFTTrainer trains on the rows as given: ``dataset_kwargs={"skip_prepare_dataset": True}``."""
    return bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))


def _unprepared_rows(dataset: Any, args: Any) -> Any:
    """The rows SFTTrainer trains on when it skips preparation: the dataset itself, which must hold them."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if TOKENIZED_COLUMN not in _columns(dataset, None):
        raise DatasetFormatError(
            f"dataset_kwargs={args.dataset_kwargs!r} skips TRL's preparation, so the rows must already be tokenized "
            f"('input_ids', with 'labels' where the loss skips tokens); this dataset has columns "
            f"{_columns(dataset, None)}. Tokenize it first, or drop skip_prepare_dataset."
        )
    # TRL's own check that mask columns without 'labels' would silently train on every token.
    skipping = _SkippingState(_skip_prepare_dataset=True, _is_vision_dataset=False)
    collator = DataCollatorForLanguageModeling(pad_token_id=0)
    SFTTrainer._reject_skip_prepare_without_labels(skipping, {"train": dataset}, collator)
    return dataset


@dataclass
class _SkippingState:
    """The attributes ``SFTTrainer._reject_skip_prepare_without_labels`` reads from its trainer."""

    _skip_prepare_dataset: bool
    _is_vision_dataset: bool


def check_sft_config(args: Any, processing_class: Any) -> None:
    """The checks ``SFTTrainer.__init__`` makes of the data settings before it prepares rows, so a cache
    is never built with settings no trainer accepts.

    TRL runs them inline in ``SFTTrainer.__init__`` (trl/trainer/sft_trainer.py: the ``eos_token``
    vocabulary check, and "When `padding_free=True` without packing, `max_length` is not enforced"),
    with no function to call, so they are restated here.
    """
    if args.padding_free and not args.packing and args.max_length is not None:
        raise ValueError(
            f"padding_free=True without packing does not enforce max_length (now {args.max_length}), so SFTTrainer "
            "refuses it: set max_length=None (hf-capgap cache build --max_length None) and give rows already cut "
            "to length, or enable packing (packing=True, packing_strategy='bfd')."
        )
    if args.eos_token is not None and processing_class is not None:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if args.eos_token not in tokenizer.get_vocab():
            raise ValueError(
                f"eos_token={args.eos_token!r} is not in the vocabulary of the tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '')!r} (SFTTrainer refuses it too): name one of its tokens, "
                "or leave eos_token=None to use the tokenizer's own."
            )


def _is_template_file(path: str) -> bool:
    """Whether SFTTrainer reads ``chat_template_path`` as a template file rather than a tokenizer to clone."""
    return os.path.isfile(path) and path.endswith((".jinja", ".j2"))


def apply_chat_template_path(processing_class: Any, args: Any) -> None:
    """Give the tokenizer ``args.chat_template_path``'s template, as ``SFTTrainer.__init__`` does
    (trl/trainer/sft_trainer.py, right after ``eos_token``) before it prepares rows.

    A ``.jinja`` / ``.j2`` file is read as the template. Any other path is a tokenizer TRL's
    ``clone_chat_template`` copies the template from, adding its tokens to the tokenizer and resizing the
    model: that would resize the teacher, so it is refused here with the way to do it first.
    """
    path = args.chat_template_path
    if path is None:
        return
    if not _is_template_file(path):
        raise DatasetFormatError(
            f"chat_template_path={path!r} is not a .jinja/.j2 file, so SFTTrainer would clone a tokenizer's template "
            "onto the model, adding tokens and resizing its embeddings. Apply trl.clone_chat_template(teacher, "
            "tokenizer, path) yourself and build with chat_template_path=None, or pass a .jinja file."
        )
    with open(path, encoding="utf-8") as template:
        processing_class.chat_template = template.read()


def template_digest(template: str | dict[str, str] | None) -> str | None:
    """A short sha256 of a chat template (a string, or a dict of named templates)."""
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _trainer_chat_template(tokenizer: Any, args: Any) -> str | dict[str, str] | None:
    """The template a trainer with ``args`` and ``tokenizer`` renders chats with, once SFTTrainer has
    applied ``chat_template_path``; None when unknown (no tokenizer, and no template file)."""
    path = args.chat_template_path
    if path is not None and _is_template_file(path):
        with open(path, encoding="utf-8") as template:
            return template.read()
    if path is not None:
        return _clone_source(path).get_chat_template()
    return None if tokenizer is None else getattr(tokenizer, "chat_template", None)


def _trainer_eos_token(tokenizer: Any, args: Any) -> str | None:
    """The eos SFTTrainer appends to text rows with ``args`` and ``tokenizer``: ``eos_token``, else the
    tokenizer's, and a cloned template's source tokenizer's over both; None when unknown."""
    path = args.chat_template_path
    if path is not None and not _is_template_file(path):
        return _clone_source(path).eos_token  # clone_chat_template sets it after eos_token
    if args.eos_token is not None:
        return args.eos_token
    return None if tokenizer is None else getattr(tokenizer, "eos_token", None)


def _clone_source(path: str) -> Any:
    """The tokenizer ``clone_chat_template`` copies from (it loads it the same way)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _longest_and_unlabelled(rows: Any, batch_rows: int = 8192) -> tuple[int, int]:
    """The longest row of tokenized rows and how many have no label (TRL's truncation drops those),
    read one column at a time in batches so no rank holds a whole column."""
    import pyarrow.compute as pc

    longest = unlabelled = 0
    for batch in rows.with_format("arrow", columns=[TOKENIZED_COLUMN]).iter(batch_size=batch_rows):
        longest = max(longest, pc.max(pc.list_value_length(batch[TOKENIZED_COLUMN])).as_py() or 0)
    if "labels" in rows.column_names:
        for per_row in _label_counts(rows, batch_rows):
            unlabelled += int((per_row == 0).sum())
    return longest, unlabelled


def _label_counts(rows: Any, batch_rows: int) -> Iterator[Any]:
    """Each row's labels that are not -100 (position 0 included), one numpy array per batch."""
    import numpy as np
    import pyarrow.compute as pc

    for batch in rows.with_format("arrow", columns=["labels"]).iter(batch_size=batch_rows):
        labels = batch["labels"]
        flat = np.asarray(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX))
        yield np.bincount(np.asarray(pc.list_parent_indices(labels)), weights=flat, minlength=len(labels))


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
    "shuffle_dataset",
)
"""The SFTConfig fields that shape the prepared rows and their collation (with ``shuffle_dataset``'s
``seed``, ``dataset_kwargs`` and ``chat_template_path``); ``hf-capgap cache build`` takes them as flags."""
_FACTS = ("dataset_format", "longest_row", "longest_untruncated_row", "unlabelled_rows")
"""Entries of a preparation record that describe the rows rather than a setting."""


def _setting(args: Any, field: str, kind: str, tokenizer: Any = None) -> Any:
    """The value of one preparation setting of ``args`` (with the trainer's ``tokenizer``) as it acts on
    rows of format ``kind``; None for the eos and chat template when they cannot be known."""
    if field == "padding_free":
        return uses_padding_free(args)
    if field == "completion_only_loss":
        return completion_only(args, kind == "prompt_completion")
    if field == "skip_prepare_dataset":
        return skips_preparation(args)
    if field == "eos_token":
        return _trainer_eos_token(tokenizer, args)
    if field == "chat_template_sha256":
        return template_digest(_trainer_chat_template(tokenizer, args))
    value = getattr(args, field)
    return bool(value) if field in ("packing", "assistant_only_loss", "shuffle_dataset") else value


def _settings_read(
    dataset: Any, args: Any, kind: str, longest: int, formatting_func: Callable[[dict], str] | None
) -> dict[str, Any]:
    """Each setting rows of format ``kind`` (longest ``longest`` tokens before truncation) depend on."""
    columns = _columns(dataset, formatting_func)
    fields = ["skip_prepare_dataset", "max_length", "packing", "shuffle_dataset"]
    if args.packing:
        fields.append("packing_strategy")
    elif args.max_length is not None and longest > args.max_length:
        fields.append("truncation_mode")  # some rows were cut
    if args.shuffle_dataset:
        fields.append("seed")
    if kind == "prompt_completion" or ("completion_mask" in columns and "labels" not in columns):
        fields.append("completion_only_loss")
    if kind != "tokenized":
        fields.append("assistant_only_loss")
    if kind == "language_modeling":
        fields.append("dataset_text_field")
    return {field: _setting(args, field, kind) for field in fields}


def preparation_disagreements(
    recorded: Mapping[str, Any], args: Any, tokenizer: Any = None
) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, value in ``args``) for each setting under which ``args`` (with the trainer's
    ``tokenizer``, before SFTTrainer applies ``eos_token`` and ``chat_template_path`` to it) would give other
    rows than those :func:`prepare_and_record` recorded.

    Without ``tokenizer``, the eos and chat template are checked only where ``args`` fixes them.
    """
    kind = recorded.get("dataset_format")
    found = []
    for field, have in recorded.items():
        if field in _FACTS:
            continue
        want = _setting(args, field, kind, tokenizer)
        if want != have and not (want is None and field in ("eos_token", "chat_template_sha256")):
            if not _same_rows_anyway(recorded, field, have, want):
                found.append((field, have, want))
    return found


def _same_rows_anyway(recorded: Mapping[str, Any], field: str, have: Any, want: Any) -> bool:
    """Whether two values of ``field`` still prepare the recorded rows alike: any two ``max_length``
    (None is unlimited) that cut no row, and drop none (a max_length drops rows with no label, None
    keeps them); ``bfd`` and ``bfd_split`` when no row is longer than the packs."""
    longest = recorded.get("longest_untruncated_row")
    if longest is None:
        return False  # recorded before the longest untruncated row was: compare strictly
    unlimited = float("inf")
    if field == "max_length" and not recorded["packing"]:
        fits = longest <= (unlimited if have is None else have) and longest <= (unlimited if want is None else want)
        return fits and (recorded["unlabelled_rows"] == 0 or None not in (have, want))
    if field == "packing_strategy":
        return {have, want} <= {"bfd", "bfd_split"} and longest <= recorded["max_length"]
    return False


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
    """What a causal LM's forward gets from a collated batch: everything but the labels, the example
    token counts and the cached teacher signal (``position_ids``, ``cu_seq_lens_*`` ... of padding-free
    batches included)."""
    return {
        key: value
        for key, value in batch.items()
        if key not in ("labels", EXAMPLE_TOKENS_KEY) and not key.startswith(TEACHER_KEY_PREFIX)
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
