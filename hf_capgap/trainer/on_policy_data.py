"""The prompts of on-policy distillation: which rows have one, and where it ends in each training row.

Rows go through TRL's SFT data path as off-policy ones do; what on-policy training adds is each row's
prompt length, read from the prepared row (the ``completion_mask`` TRL builds, or the labels it masked
from it) by :class:`PromptLengthsCollator`. Prompt-only rows get an empty completion first, since TRL's
preparation tokenizes a ``prompt`` column as prompt + completion. :func:`check_prompt_boundaries` refuses,
before training, the rows generation cannot start from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hf_capgap.data import IGNORE_INDEX, TOKENIZED_COLUMN, require_chat_template
from hf_capgap.data.formats import dataset_columns, first_example, is_chat
from hf_capgap.data.sft import PROMPT_IDS_KEY, PROMPT_LENGTHS_KEY
from hf_capgap.errors import ConfigError

# The completion a prompt-only row gets: TRL appends the EOS to plain text, and renders an empty assistant
# turn after the generation prompt for chat rows, so the completion mask starts right after the prompt.
_EMPTY_TEXT = ""
_EMPTY_TURN = [{"role": "assistant", "content": ""}]


def _setting(args: Any) -> str:
    return f"lmbda={args.lmbda}" if args.lmbda > 0 else "seq_kd=True"


def prompt_rows(dataset: Any, args: Any, tokenizer: Any, formatting_func: Callable | None) -> tuple[Any, Any, bool]:
    """``dataset`` as rows with a prompt boundary, for a config that generates (lmbda > 0 or seq_kd); those
    rows again when they are prompt-only ones given an empty completion (else None); and whether the rows are
    pre-tokenized (their labels the user's, which must mark one completion span).

    Prompt-completion rows (plain or conversational) are kept; prompt-only rows get an empty completion;
    pre-tokenized rows need ``completion_mask`` (0 on the prompt) or ``labels`` (-100 on the prompt).
    Refused: ``text`` and ``messages`` rows (nothing says where a prompt ends), a ``formatting_func`` (it
    makes every row plain text), prompt-only rows when some micro-batches keep the dataset's completion
    (lmbda < 1 without seq_kd), and conversational prompts with a tokenizer that has no chat template.
    """
    setting = _setting(args)
    if formatting_func is not None:
        raise ConfigError(
            f"{setting} with a formatting_func: it turns each row into plain text, so no prompt is left to generate "
            "from. Give prompt / completion columns instead, or set lmbda=0 and seq_kd=False."
        )
    columns = dataset_columns(dataset, None)
    if TOKENIZED_COLUMN in columns:
        if "completion_mask" not in columns and "labels" not in columns:
            raise ConfigError(
                f"{setting} with pre-tokenized rows of only {TOKENIZED_COLUMN!r}: nothing says where the prompt ends. "
                "Add a completion_mask column (0 on prompt tokens, 1 on completion tokens)."
            )
        return dataset, None, True
    if "prompt" not in columns:
        raise ConfigError(
            f"{setting} needs prompts to generate from, and rows of columns {columns} have none (a 'text' or "
            "'messages' row does not say where its prompt ends). Give 'prompt' rows (prompt-only or with "
            "'completion'; for chat, e.g. prompt=messages[:-1], completion=messages[-1:]), or set lmbda=0 and "
            "seq_kd=False."
        )
    chat = is_chat(first_example(dataset))
    if chat:
        require_chat_template(tokenizer)
    if "completion" in columns:
        return dataset, None, False
    if args.lmbda < 1 and not args.seq_kd:
        raise ConfigError(
            f"prompt-only rows with lmbda={args.lmbda} and seq_kd=False: the micro-batches not sampled from the "
            "student (probability 1 - lmbda) would train on the dataset's completion, and there is none. Set "
            "lmbda=1.0, or seq_kd=True (the teacher samples them), or add a 'completion' column."
        )
    rows = dataset.map(_add_completion, fn_kwargs={"completion": _EMPTY_TURN if chat else _EMPTY_TEXT})
    return rows, rows, False


def _add_completion(row: Mapping[str, Any], completion: Any) -> dict[str, Any]:
    return {"completion": completion}


def check_eval_rows(dataset: Any) -> None:
    """Refuse prompt-only evaluation rows: evaluation scores the dataset's completions (it does not generate)."""
    if dataset is None:
        return
    columns = dataset_columns(dataset, None)
    if "prompt" in columns and "completion" not in columns and TOKENIZED_COLUMN not in columns:
        raise ConfigError(
            "eval_dataset has prompt-only rows: evaluation scores the dataset's completions (the student against "
            "the teacher on fixed text; it generates nothing), so eval rows need a 'completion' column. Give the "
            "eval rows their reference completions, or evaluate on another prompt-completion set."
        )


def _mark_column(columns: Sequence[str]) -> str | None:
    """The column :func:`prompt_length` reads a row's prompt boundary from."""
    return "completion_mask" if "completion_mask" in columns else "labels" if "labels" in columns else None


def _marks(example: Mapping[str, Any]) -> list[bool]:
    """Which tokens of a prepared row are completion: its ``completion_mask`` (kept untruncated by TRL, so cut to
    the row), or its labels (TRL masks the prompt with -100 when the loss is completion-only)."""
    length = len(example[TOKENIZED_COLUMN])
    if _mark_column(list(example)) == "completion_mask":
        return [bool(mark) for mark in example["completion_mask"][:length]]
    return [label != IGNORE_INDEX for label in example.get("labels", ())]


def prompt_length(example: Mapping[str, Any]) -> int:
    """Tokens before the completion in a prepared row (all of them when it has no completion token)."""
    marks = _marks(example)
    return next((i for i, mark in enumerate(marks) if mark), len(example[TOKENIZED_COLUMN]))


def _refusal(row: int | None, problem: str, max_length: int | None = None) -> ConfigError:
    where = "a training row" if row is None else f"train_dataset row {row}"
    fixes = {
        "empty": "has no prompt token (its first token is already completion / labelled): nothing to generate "
        "from. Give every row a non-empty prompt.",
        "spans": "has completion / labelled tokens in more than one span (e.g. assistant-only labels of a "
        "multi-turn conversation): generation would keep only the text before the first span. Split the "
        "conversation into prompt / completion rows (prompt=messages[:i], completion=messages[i:i+1]).",
        "room": f"has a prompt that fills max_length={max_length} (TRL cut it there): no room to generate. "
        "Raise max_length or shorten prompts.",
    }
    return ConfigError(f"{where} {fixes[problem]}")


def check_prompt_boundaries(dataset: Any, max_length: int | None, one_span: bool, batch_rows: int = 1024) -> None:
    """Refuse, before training, a prepared row generation cannot start from: no prompt token, with
    ``one_span`` (pre-tokenized rows, whose labels the user made) labelled tokens in more than one span, or
    a prompt of ``max_length`` tokens or more; naming the row. Rows TRL built from prompt / completion
    columns start their completion at the prompt's end, however many assistant turns it labels.

    One vectorised pass over the boundary column of a map-style dataset. A stream is not read ahead (that
    would consume it): its rows are checked as they are collated (:class:`PromptLengthsCollator`), and a
    batch's room within ``max_length`` when it is sampled.
    """
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    column = _mark_column(dataset.column_names) if isinstance(dataset, datasets.Dataset) else None
    if column is None:
        return
    first_row = 0
    for batch in dataset.with_format("arrow").iter(batch_size=batch_rows):
        rows = np.asarray(pc.list_value_length(batch[TOKENIZED_COLUMN]))
        marked = batch[column].combine_chunks()
        values = np.asarray(pc.list_flatten(marked))
        parents = np.asarray(pc.list_parent_indices(marked))
        starts = np.concatenate([[0], np.cumsum(np.asarray(pc.list_value_length(marked)))[:-1]])
        position = np.arange(len(values)) - starts[parents]
        marks = (values != 0 if column == "completion_mask" else values != IGNORE_INDEX) & (position < rows[parents])
        prompt = rows.copy()
        hits = np.flatnonzero(marks)
        hit_rows, first = np.unique(parents[hits], return_index=True)
        prompt[hit_rows] = position[hits[first]]
        opens = marks & ~np.concatenate([[False], marks[:-1]]) | marks & (position == 0)
        spans = np.bincount(parents[opens], minlength=len(rows))
        problems = {
            "empty": prompt == 0,
            "spans": spans > 1 if one_span else np.zeros(len(rows), bool),
            "room": prompt >= max_length if max_length is not None else np.zeros(len(rows), bool),
        }
        for problem, bad in problems.items():
            if bad.any():
                raise _refusal(first_row + int(np.flatnonzero(bad)[0]), problem, max_length)
        first_row += len(rows)


class PromptLengthsCollator:
    """A training collator that adds each row's prompt length (``PROMPT_LENGTHS_KEY``) and its prompt tokens
    (``PROMPT_IDS_KEY``, right-padded), read from the rows before the collator pads them on either side; it
    refuses, as they come, the rows :func:`check_prompt_boundaries` refuses (a stream's are not read ahead)."""

    def __init__(self, collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]], one_span: bool) -> None:
        self.collator = collator
        self.one_span = one_span

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        lengths = [prompt_length(example) for example in examples]  # before collating, which may consume them
        if 0 in lengths:
            raise _refusal(None, "empty")
        marks = [_marks(example) for example in examples] if self.one_span else []
        if any(sum(a and not b for a, b in zip(row, [False, *row], strict=False)) > 1 for row in marks):
            raise _refusal(None, "spans")
        prompts = [torch.as_tensor(row[TOKENIZED_COLUMN][:n]) for row, n in zip(examples, lengths, strict=True)]
        batch = self.collator(examples)
        batch[PROMPT_LENGTHS_KEY] = torch.tensor(lengths)
        batch[PROMPT_IDS_KEY] = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
        return batch
