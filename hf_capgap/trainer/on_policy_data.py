"""The prompts of on-policy distillation: which rows have one, and where it ends in each training row.

Rows go through TRL's SFT data path as off-policy ones do; what on-policy training adds is each row's
prompt length, read from the prepared row (the ``completion_mask`` TRL builds, or the labels it masked
from it) by :class:`PromptLengthsCollator`. Prompt-only rows get an empty completion first, since TRL's
preparation tokenizes a ``prompt`` column as prompt + completion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hf_capgap.data import IGNORE_INDEX, TOKENIZED_COLUMN, require_chat_template
from hf_capgap.data.formats import dataset_columns, first_example, is_chat
from hf_capgap.data.sft import PROMPT_LENGTHS_KEY
from hf_capgap.errors import ConfigError

# The completion a prompt-only row gets: TRL appends the EOS to plain text, and renders an empty assistant
# turn after the generation prompt for chat rows, so the completion mask starts right after the prompt.
_EMPTY_TEXT = ""
_EMPTY_TURN = [{"role": "assistant", "content": ""}]


def _setting(args: Any) -> str:
    return f"lmbda={args.lmbda}" if args.lmbda > 0 else "seq_kd=True"


def prompt_rows(dataset: Any, args: Any, tokenizer: Any, formatting_func: Callable | None) -> Any:
    """``dataset`` as rows with a prompt boundary, for a config that generates (lmbda > 0 or seq_kd).

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
        return dataset
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
        return dataset
    if args.lmbda < 1 and not args.seq_kd:
        raise ConfigError(
            f"prompt-only rows with lmbda={args.lmbda} and seq_kd=False: the micro-batches not sampled from the "
            "student (probability 1 - lmbda) would train on the dataset's completion, and there is none. Set "
            "lmbda=1.0, or seq_kd=True (the teacher samples them), or add a 'completion' column."
        )
    return dataset.map(_add_completion, fn_kwargs={"completion": _EMPTY_TURN if chat else _EMPTY_TEXT})


def _add_completion(row: Mapping[str, Any], completion: Any) -> dict[str, Any]:
    return {"completion": completion}


def prompt_length(example: Mapping[str, Any]) -> int:
    """Tokens before the completion in a prepared row: the leading zeros of its ``completion_mask``, or where
    its labels start (TRL masks the prompt with -100 when the loss is completion-only)."""
    length = len(example[TOKENIZED_COLUMN])
    mask = example.get("completion_mask")
    marks = mask[:length] if mask is not None else [label != IGNORE_INDEX for label in example.get("labels", ())]
    return next((i for i, mark in enumerate(marks) if mark), length)


class PromptLengthsCollator:
    """A training collator that adds each row's prompt length (``PROMPT_LENGTHS_KEY``) to the batch."""

    def __init__(self, collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        lengths = [prompt_length(example) for example in examples]  # before collating, which may consume them
        if 0 in lengths:
            raise ConfigError(
                "a training row has no prompt token (its first token is already in the completion / labelled): "
                "nothing to generate from. Give every row a non-empty prompt."
            )
        batch = self.collator(examples)
        batch[PROMPT_LENGTHS_KEY] = torch.tensor(lengths)
        return batch
