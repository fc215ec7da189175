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


def labelled_positions_per_row(labels: Any, row_lengths: Sequence[int]) -> list[int]:
    """How many labelled positions each row has in a collated batch (padded, or padding-free).

    Padded: row i owns ``labels[i, 1:]``. Padding-free: the batch is one row of the rows
    concatenated, row i owns the positions ``[offset_i, offset_i + length_i)``; its last one predicts
    the next row's first token, which the collator labels -100.
    """
    mask = labels[:, 1:] != -100
    if labels.shape[0] == len(row_lengths):
        return mask.sum(dim=1).tolist()
    flat = mask.reshape(-1)
    counts, offset = [], 0
    for length in row_lengths:
        counts.append(int(flat[offset : offset + length].sum()))
        offset += length
    return counts


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
    labels = batch["labels"].to(device)
    counts = labelled_positions_per_row(labels, [len(row["input_ids"]) for row in rows])
    logits = teacher(**inputs, use_cache=False).logits[:, :-1][labels[:, 1:] != -100]
    logits = logits[:, : spec["real_vocab_size"]]
    signals, start = [], 0
    # Row by row: each row samples from its own generator, and the fp32 copies stay one row large.
    for offset, count in enumerate(counts):
        signals.append(row_signal(logits[start : start + count], first_row + offset, spec))
        start += count
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
    """The stored teacher signal of one row, from its logits at labelled positions [positions, vocab]."""
    import torch

    logprobs = torch.log_softmax(logits.float() / spec["temperature"], dim=-1)
    if spec["mode"] == "topk":
        values, ids = logprobs.topk(spec["k"], dim=-1)
        # Exact tail mass: logsumexp over the ids outside the top-k (no 1 - sum cancellation).
        tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
        return {
            "topk_ids": _ids(ids, spec),
            "topk_logprobs": _stored_values(values, spec),
            "tail_logprob": tail.clamp(min=LOGPROB_FLOOR).cpu().numpy(),
        }
    if spec["mode"] == "sampled":
        ids, counts, sizes = sample_distinct(logprobs, spec["k"], np.random.SeedSequence([spec["seed"], row_index]))
        entropy = torch.special.entr(logprobs.exp()).sum(dim=-1)
        return {
            "sample_ids": _ids(ids, spec),
            "sample_counts": counts.cpu().numpy().astype(np.uint8),
            "sample_sizes": sizes.cpu().numpy().astype(np.uint8),
            "entropy": _stored_values(entropy, spec),
        }
    return {"logprobs": _stored_values(logprobs, spec)}


def sample_distinct(logprobs: Any, draws: int, seed: np.random.SeedSequence) -> tuple[Any, Any, Any]:
    """``draws`` draws with replacement per position, as the distinct ids of each position (ascending),
    their counts, and how many distinct ids each position has (flat, position after position).

    Each row draws from its own generator seeded by (seed, row index): rebuilds, batch sizes and
    process counts never change which tokens a row gets.
    """
    import torch

    generator = torch.Generator(device=logprobs.device).manual_seed(int(seed.generate_state(1, np.uint64)[0]))
    drawn = torch.multinomial(logprobs.exp(), draws, replacement=True, generator=generator).sort(dim=-1).values
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
