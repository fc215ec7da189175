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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hf_capgap.data.chat_templates import apply_chat_template_path, template_digest
from hf_capgap.data.formats import (
    IGNORE_INDEX,
    TOKENIZED_COLUMN,
    DatasetFormatError,
    check_dataset,
    check_sft_config,
    completion_only,
    dataset_columns,
    dataset_format,
    first_example,
    is_chat,
    skips_preparation,
    uses_padding_free,
)
from hf_capgap.data.preparation_record import longest_and_unlabelled, settings_read

TEACHER_KEY_PREFIX = "teacher_"
# Each example's token count in an evaluation batch: where a padding-free batch's rows end (trainer metrics).
EXAMPLE_TOKENS_KEY = "example_tokens"
# Each row's prompt length and prompt tokens in an on-policy training batch, read from the row before the
# collator pads it (on either side): what generation starts from (trainer.on_policy_data).
PROMPT_LENGTHS_KEY = "prompt_lengths"
PROMPT_IDS_KEY = "prompt_ids"
# Set on a micro-batch whose completions the student sampled: its loss is the divergence alone (trainer.on_policy).
STUDENT_SAMPLED_KEY = "sampled_by_student"
_NOT_MODEL_INPUTS = ("labels", EXAMPLE_TOKENS_KEY, PROMPT_LENGTHS_KEY, PROMPT_IDS_KEY, STUDENT_SAMPLED_KEY)


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
    prepared, _ = prepare_and_record(
        dataset, processing_class, args, formatting_func=formatting_func, dataset_name=dataset_name
    )
    return prepared


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
    example = first_example(dataset)
    state = _preparation_state(example, processing_class, args)
    tokenizing = copy.copy(args)
    tokenizing.max_length, tokenizing.shuffle_dataset = None, False
    tokenized = SFTTrainer._prepare_dataset(
        state, dataset, processing_class, tokenizing, False, formatting_func, dataset_name
    )
    longest, unlabelled = longest_and_unlabelled(tokenized)
    prepared = SFTTrainer._prepare_dataset(state, tokenized, processing_class, args, args.packing, None, dataset_name)
    kind = dataset_format(dataset_columns(dataset, formatting_func), args)
    record = {
        "dataset_format": kind,
        "longest_untruncated_row": longest,
        "unlabelled_rows": unlabelled,
        **settings_read(dataset, args, kind, longest, formatting_func),
    }
    if processing_class is not None and kind != "tokenized":
        if is_chat(example):
            record["chat_template_sha256"] = template_digest(processing_class.chat_template)
        else:
            record["eos_token"] = processing_class.eos_token  # the one appended to each text
    return prepared, record


def _unprepared_rows(dataset: Any, args: Any) -> Any:
    """The rows SFTTrainer trains on when it skips preparation: the dataset itself, which must hold them."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if TOKENIZED_COLUMN not in dataset_columns(dataset, None):
        raise DatasetFormatError(
            f"dataset_kwargs={args.dataset_kwargs!r} skips TRL's preparation, so the rows must already be tokenized "
            f"('input_ids', with 'labels' where the loss skips tokens); this dataset has columns "
            f"{dataset_columns(dataset, None)}. Tokenize it first, or drop skip_prepare_dataset."
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


def forward_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What a causal LM's forward gets from a collated batch: everything but the labels, the example
    token counts, the on-policy keys and the cached teacher signal (``position_ids``, ``cu_seq_lens_*``
    ... of padding-free batches included)."""
    return {
        key: value
        for key, value in batch.items()
        if key not in _NOT_MODEL_INPUTS and not key.startswith(TEACHER_KEY_PREFIX)
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


def prompt_completion_rows(rows: Any, prompt_tokens: int, completion_tokens: int) -> Any:
    """Packed token rows cut for on-policy training (same rows, same order): each row's first ``prompt_tokens``
    as its prompt and its next ``completion_tokens`` (0: a prompt-only row) as the completion, pre-tokenized
    with a ``completion_mask`` marking where the prompt ends."""
    mask = [0] * prompt_tokens + [1] * completion_tokens

    def cut(row: Mapping[str, Any]) -> dict[str, Any]:
        return {"input_ids": row["input_ids"][: prompt_tokens + completion_tokens], "completion_mask": mask}

    return rows.map(cut, remove_columns=rows.column_names)
