"""The record of a preparation: what the prepared rows depend on (their format, longest row before
truncation, rows without a label, each data setting the format reads), and which settings of another
config would prepare other rows, so a teacher cache refuses a trainer whose rows differ from its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from hf_capgap.data.chat_templates import template_digest, trainer_chat_template, trainer_eos_token
from hf_capgap.data.formats import (
    IGNORE_INDEX,
    TOKENIZED_COLUMN,
    completion_only,
    dataset_columns,
    skips_preparation,
    uses_padding_free,
)


def longest_and_unlabelled(rows: Any, batch_rows: int = 8192) -> tuple[int, int]:
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
        return trainer_eos_token(tokenizer, args)
    if field == "chat_template_sha256":
        return template_digest(trainer_chat_template(tokenizer, args))
    value = getattr(args, field)
    return bool(value) if field in ("packing", "assistant_only_loss", "shuffle_dataset") else value


def settings_read(
    dataset: Any, args: Any, kind: str, longest: int, formatting_func: Callable[[dict], str] | None
) -> dict[str, Any]:
    """Each setting rows of format ``kind`` (longest ``longest`` tokens before truncation) depend on."""
    columns = dataset_columns(dataset, formatting_func)
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
