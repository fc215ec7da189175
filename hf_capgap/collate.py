"""Batching of tokenized rows for causal-LM distillation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hf_capgap.losses import IGNORE_INDEX


def _as_long(values: Any) -> Tensor:
    return values.long() if isinstance(values, Tensor) else torch.as_tensor(values, dtype=torch.long)


@dataclass(frozen=True)
class CausalLMCollator:
    """Right-pads ``input_ids`` (and ``labels`` if given) of variable-length rows.

    Labels default to the input ids; padded positions get label -100 and attention mask 0, so they
    count neither in the loss nor in ``num_items_in_batch``.
    """

    pad_token_id: int = 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of rows.")
        rows = [_as_long(feature["input_ids"]) for feature in features]
        labels = [_as_long(feature.get("labels", feature["input_ids"])) for feature in features]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        padded_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
            if len(label) != len(row):
                raise ValueError(f"row {i}: labels has {len(label)} entries but input_ids has {len(row)}.")
            input_ids[i, : len(row)] = row
            padded_labels[i, : len(row)] = label
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": padded_labels}
