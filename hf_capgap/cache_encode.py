"""Encoding a teacher's next-token distributions as Arrow record batches of a cache shard.

Ids are uint16 when the vocabulary fits, else uint32; log-probs are fp16 or, since Arrow has no
bfloat16, the bf16 bit pattern in uint16; the top-k tail is float32. Every list is fixed-size, so a
shard carries no offsets and reads back as [rows, positions, k] arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from hf_capgap.cache import LOGPROB_FLOOR, SIGNAL_COLUMNS


def _value_type(spec: dict[str, Any]) -> pa.DataType:
    """fp16 as Arrow half floats; bf16 (which Arrow lacks) as its raw bit pattern in uint16."""
    return pa.float16() if spec["dtype"] == "float16" else pa.uint16()


def shard_schema(spec: dict[str, Any]) -> pa.Schema:
    ids = pa.uint16() if spec["id_dtype"] == "uint16" else pa.uint32()
    length, positions, k = spec["seq_len"], spec["seq_len"] - 1, spec["k"]
    value = _value_type(spec)

    def per_position(item: pa.DataType, width: int) -> pa.DataType:
        return pa.list_(pa.list_(item, width), positions)

    fields = [pa.field("input_ids", pa.list_(ids, length))]
    if spec["has_labels"]:
        fields.append(pa.field("labels", pa.list_(pa.int32(), length)))
    if spec["mode"] == "topk":
        fields += [
            pa.field("topk_ids", per_position(ids, k)),
            pa.field("topk_logprobs", per_position(value, k)),
            pa.field("tail_logprob", pa.list_(pa.float32(), positions)),
        ]
    elif spec["mode"] == "sampled":
        counts = pa.uint8() if k < 256 else pa.uint16() if k < 65536 else pa.uint32()
        fields += [
            pa.field("sample_ids", per_position(ids, k)),
            pa.field("sample_counts", per_position(counts, k)),
            pa.field("sample_logprobs", per_position(value, k)),
        ]
    else:
        fields.append(pa.field("logprobs", per_position(value, k)))
    return pa.schema(fields)


def _nested(array: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """A [rows, d1, d2, ...] numpy array as nested fixed-size lists of ``arrow_type``."""
    if not pa.types.is_fixed_size_list(arrow_type):
        return pa.array(np.ascontiguousarray(array).reshape(-1), type=arrow_type)
    inner = _nested(array, arrow_type.value_type)
    return pa.FixedSizeListArray.from_arrays(inner, arrow_type.list_size)


def _stored_values(values: Any, spec: dict[str, Any]) -> np.ndarray:
    import torch

    values = values.clamp(min=LOGPROB_FLOOR)
    if spec["dtype"] == "float16":
        return values.to(torch.float16).cpu().numpy()
    return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def encode_batch(
    teacher: Any, rows: dict[str, np.ndarray], first_row: int, spec: dict[str, Any], schema: pa.Schema
) -> pa.RecordBatch:
    """Run the teacher on one batch of rows and encode its signal as an Arrow record batch."""
    import torch

    device = next(teacher.parameters()).device
    input_ids = torch.as_tensor(np.asarray(rows["input_ids"], dtype=np.int64), device=device)
    logits = teacher(input_ids=input_ids).logits[:, :-1, : spec["vocab_size"]]
    id_np = np.uint16 if spec["id_dtype"] == "uint16" else np.uint32
    columns: dict[str, np.ndarray] = {"input_ids": input_ids.cpu().numpy().astype(id_np)}
    if spec["has_labels"]:
        columns["labels"] = np.asarray(rows["labels"], dtype=np.int32)
    # Row by row, so the fp32 copies of [positions, vocab] stay one row large.
    signals = [_row_signal(row_logits, first_row + offset, spec) for offset, row_logits in enumerate(logits)]
    for name in SIGNAL_COLUMNS[spec["mode"]]:
        item_type = schema.field(name).type
        while pa.types.is_fixed_size_list(item_type):
            item_type = item_type.value_type
        columns[name] = np.stack([signal[name] for signal in signals]).astype(
            item_type.to_pandas_dtype(), copy=False
        )
    return pa.RecordBatch.from_arrays([_nested(columns[f.name], f.type) for f in schema], schema=schema)


def _row_signal(logits: Any, row_index: int, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """The stored teacher signal of one row, from its logits [positions, vocab]."""
    import torch

    logprobs = torch.log_softmax(logits.float() / spec["temperature"], dim=-1)
    if spec["mode"] == "topk":
        values, ids = logprobs.topk(spec["k"], dim=-1)
        # Exact tail mass: logsumexp over the ids outside the top-k (no 1 - sum cancellation).
        tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
        return {
            "topk_ids": ids.cpu().numpy(),
            "topk_logprobs": _stored_values(values, spec),
            "tail_logprob": tail.clamp(min=LOGPROB_FLOOR).cpu().numpy(),
        }
    if spec["mode"] == "sampled":
        ids, counts = _sample(logprobs, row_index, spec)
        values = torch.where(counts > 0, logprobs.gather(-1, ids), torch.zeros((), device=logprobs.device))
        return {
            "sample_ids": ids.cpu().numpy(),
            "sample_counts": counts.cpu().numpy(),
            "sample_logprobs": _stored_values(values, spec),
        }
    return {"logprobs": _stored_values(logprobs, spec)}


def _sample(logprobs: Any, row_index: int, spec: dict[str, Any]) -> tuple[Any, Any]:
    """k draws with replacement per position, as ascending unique ids + counts padded to k (count 0).

    Each row draws from its own generator seeded by (seed, row index): rebuilds, batch sizes and
    process counts never change which tokens a row gets.
    """
    import torch

    state = np.random.SeedSequence([spec["seed"], row_index]).generate_state(1, np.uint64)[0]
    generator = torch.Generator(device=logprobs.device).manual_seed(int(state))
    draws = (
        torch.multinomial(logprobs.exp(), spec["k"], replacement=True, generator=generator)
        .sort(dim=-1)
        .values
    )
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.long().cumsum(dim=-1) - 1
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    return ids, counts
