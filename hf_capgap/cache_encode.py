"""The teacher signal of one collated batch, encoded as an Arrow record batch of a cache shard.

The teacher runs on the batch exactly as the online teacher does in the trainer (same collator, same
forward inputs, so packed documents never attend to each other), under ``inference_mode`` in its
own dtype; only its logits at labelled positions are turned into a signal, on the teacher's device.
Ids use the narrowest unsigned type of the real vocabulary; log-probs are fp16 or, since Arrow has
no bfloat16, the bf16 bit pattern in uint16; the top-k tail is float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from hf_capgap.cache_format import LOGPROB_FLOOR, ROW_COLUMNS


def row_positions(labels: Any, row_lengths: Sequence[int]) -> list[tuple[int, slice, Any]]:
    """(batch row, positions, labelled mask over them) of each dataset row in a collated batch.

    Padded: row i owns positions ``[0, length_i - 1)`` of batch row i. Padding-free: the batch is one
    row of the rows concatenated; row i owns ``[offset_i, offset_i + length_i)``, whose last position
    predicts the next row's first token, which the collator labels -100.
    """
    mask = labels[:, 1:] != -100
    if labels.shape[0] == len(row_lengths):
        return [(i, slice(0, length - 1), mask[i, : length - 1]) for i, length in enumerate(row_lengths)]
    spans, offset = [], 0
    for length in row_lengths:
        positions = slice(offset, min(offset + length, mask.shape[1]))
        spans.append((0, positions, mask[0, positions]))
        offset += length
    return spans


def encode_batch(
    teacher: Any,
    rows: Sequence[Mapping[str, Any]],
    batch: Mapping[str, Any],
    first_row: int,
    spec: dict[str, Any],
    schema: pa.Schema,
) -> pa.RecordBatch:
    """Run the teacher on ``batch`` (the collated ``rows``) and encode rows + signal for ``schema``."""
    import torch

    from hf_capgap.sft_data import forward_inputs

    device = next(teacher.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in forward_inputs(batch).items()}
    logits = teacher(**inputs, use_cache=False).logits[..., : spec["real_vocab_size"]]
    signals = []
    # Row by row: each row samples from its own generator, the fp32 copies stay one row large, and a
    # row labelled throughout (pretraining text) is a view of the logits, not a gathered copy.
    spans = row_positions(batch["labels"].to(device), [len(row["input_ids"]) for row in rows])
    for offset, (index, positions, labelled) in enumerate(spans):
        row_logits = logits[index, positions]
        row_logits = row_logits if bool(labelled.all()) else row_logits[labelled]
        signals.append(row_signal(row_logits, first_row + offset, spec))
    return _record_batch(rows, signals, spec, schema)


def _stored_values(values: Any, spec: dict[str, Any]) -> np.ndarray:
    import torch

    values = values.clamp(min=LOGPROB_FLOOR)
    if spec["dtype"] == "float16":
        return values.to(torch.float16).cpu().numpy()
    return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def _ids(ids: Any, spec: dict[str, Any]) -> np.ndarray:
    """Ids in their stored type, refusing any that the real vocabulary does not hold."""
    array = ids.cpu().numpy()
    if array.size and int(array.max()) >= spec["real_vocab_size"]:
        raise AssertionError(f"teacher signal id {int(array.max())} is outside the real vocabulary.")
    return array.astype(spec["id_dtype"])


def row_signal(logits: Any, row_index: int, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """The stored teacher signal of one row, from its logits at labelled positions [positions, vocab].

    Each [positions, vocab] pass counts (with a small teacher they cost as much as its forward), so
    every quantity is taken from ``logprobs`` and one ``exp`` of it.
    """
    import torch

    values = logits.float()
    logprobs = torch.log_softmax(values if spec["temperature"] == 1.0 else values / spec["temperature"], dim=-1)
    if spec["mode"] == "topk":
        top, ids = logprobs.topk(spec["k"], dim=-1)
        # Exact tail mass: the sum of the probabilities outside the top-k (no 1 - sum cancellation).
        tail = logprobs.exp().scatter_(-1, ids, 0.0).sum(dim=-1).log_()
        return {
            "topk_ids": _ids(ids, spec),
            "topk_logprobs": _stored_values(top, spec),
            "tail_logprob": tail.clamp_(min=LOGPROB_FLOOR).cpu().numpy(),
        }
    if spec["mode"] == "sampled":
        probs = logprobs.exp()
        ids, counts, sizes = sample_distinct(probs, spec["k"], np.random.SeedSequence([spec["seed"], row_index]))
        entropy = -torch.linalg.vecdot(probs, logprobs)  # terms p log p share one sign: no cancellation
        return {
            "sample_ids": _ids(ids, spec),
            "sample_counts": counts.cpu().numpy().astype(np.uint8),
            "sample_sizes": sizes.cpu().numpy().astype(np.uint8),
            "entropy": _stored_values(entropy, spec),
        }
    return {"logprobs": _stored_values(logprobs, spec)}


def sample_distinct(probs: Any, draws: int, seed: np.random.SeedSequence) -> tuple[Any, Any, Any]:
    """``draws`` draws with replacement per position of ``probs`` [positions, vocab], as the distinct
    ids of each position (ascending), their counts, and how many distinct ids each position has
    (flat, position after position).

    Each row draws from its own generator seeded by (seed, row index): rebuilds, batch sizes and
    process counts never change which tokens a row gets.
    """
    import torch

    generator = torch.Generator(device=probs.device).manual_seed(int(seed.generate_state(1, np.uint64)[0]))
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator).sort(dim=-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    starts = first.reshape(-1).nonzero().squeeze(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([drawn.numel()])])
    return drawn.reshape(-1)[starts], ends - starts, first.sum(dim=-1)


def _list_array(values: np.ndarray, lengths: Sequence[int], item_type: pa.DataType) -> pa.Array:
    """Rows of ``values`` (concatenated, ``lengths[i]`` entries for row i) as an Arrow list array."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if pa.types.is_fixed_size_list(item_type):
        inner = pa.array(np.ascontiguousarray(values).reshape(-1), type=item_type.value_type)
        items: pa.Array = pa.FixedSizeListArray.from_arrays(inner, item_type.list_size)
    else:
        items = pa.array(np.ascontiguousarray(values).reshape(-1), type=item_type)
    return pa.ListArray.from_arrays(pa.array(offsets), items)


def _record_batch(
    rows: Sequence[Mapping[str, Any]], signals: list[dict[str, np.ndarray]], spec: dict[str, Any], schema: pa.Schema
) -> pa.RecordBatch:
    arrays = []
    for field in schema:
        item_type = field.type.value_type
        if field.name in ROW_COLUMNS:
            parts = [np.asarray(row[field.name]) for row in rows]
        else:
            parts = [signal[field.name] for signal in signals]
        leaf = item_type.value_type if pa.types.is_fixed_size_list(item_type) else item_type
        values = np.concatenate(parts).astype(leaf.to_pandas_dtype(), copy=False)
        arrays.append(_list_array(values, [len(part) for part in parts], item_type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
