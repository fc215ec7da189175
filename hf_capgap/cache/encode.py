"""The teacher signal of one collated batch, encoded as an Arrow record batch of a cache shard.

The teacher runs on the batch exactly as the online teacher does in the trainer (same collator, same
forward inputs, so packed documents never attend to each other), under ``inference_mode`` in its
own dtype; only its logits at labelled positions are formed and turned into a signal, a block of
positions at a time, on the teacher's device.
Top-k ids use the narrowest unsigned type of the real vocabulary, sampled ids the varint-coded gaps
between them; log-probs are fp16 or, since Arrow has no bfloat16, the bf16 bit pattern in uint16;
the top-k tail is float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from hf_capgap.cache.format import LOGPROB_FLOOR, ROW_COLUMNS, encode_id_gaps

CPU_HEAD_ELEMENTS = 1 << 24
"""CPU: logits per lm_head matmul (64 MiB fp32). A CPU matmul repacks the [vocab, hidden] weight at
every call, which costs as much as a small block's multiply: 64-position blocks ran the head of a
hidden-512 teacher 2.3x slower than one whole-batch matmul (bench/bench_cache_training.py)."""
CPU_SIGNAL_ELEMENTS = 1 << 21
"""CPU: logits per block of signal computation (8 MiB fp32), so its passes over the vocabulary stay
in cache."""
SEGMENT = 256
"""Weights per fp32 partial sum when sampling (see :func:`inverse_cdf`)."""
ACCELERATOR_BLOCK_ELEMENTS = 1 << 28
"""Accelerators: logits per block (1 GiB fp32, plus its float64 cumulative sum when sampling): few
kernel launches, a bounded buffer at any vocabulary. Not yet measured on a GPU."""


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
    return encode_states(LabelledStates.of(teacher, rows, batch), rows, first_row, spec, schema)


def encode_states(
    states: LabelledStates, rows: Sequence[Mapping[str, Any]], first_row: int, spec: dict[str, Any], schema: pa.Schema
) -> pa.RecordBatch:
    """The record batch of ``rows`` (numbered from ``first_row``) and the signal ``spec`` makes of their
    teacher ``states``: what the build writes, and what a ``bytes_per_token`` budget measures."""
    return _record_batch(rows, states.signal(first_row, spec), states.positions, spec, schema)


class LabelledStates:
    """The teacher's last states at a batch's labelled positions, one piece per dataset row, and the
    lm_head that turns them into logits (None: the states are the logits).

    Where the teacher's lm_head can be taken out of the model (:func:`hf_capgap.losses.lm_head.choose_lm_head`),
    the teacher returns last hidden states and the head is applied a block of labelled positions at a
    time: the [batch, seq, vocab] logits never exist (at 150k tokens they outweigh the teacher's
    activations many times over) and unlabelled positions cost no head matmul.
    """

    def __init__(self, pieces: list[Any], head: Any) -> None:
        self.pieces, self.head = pieces, head
        self.positions = [len(piece) for piece in pieces]
        # Where the logits are formed: the head's device, which a model split over devices may not
        # have given its last hidden states.
        self.device = pieces[0].device if head is None else head.weight.device

    @classmethod
    def of(cls, teacher: Any, rows: Sequence[Mapping[str, Any]], batch: Mapping[str, Any]) -> LabelledStates:
        import torch

        from hf_capgap.data import forward_inputs
        from hf_capgap.losses.lm_head import lm_head_bypassed

        device = next(teacher.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in forward_inputs(batch).items()}
        head = fusable_head(teacher)
        with lm_head_bypassed(teacher, head) if head is not None else contextlib.nullcontext():
            states = teacher(**inputs, use_cache=False).logits
        spans = row_positions(batch["labels"].to(device), [len(row["input_ids"]) for row in rows])
        # A row labelled throughout (pretraining text) is a view of the states, not a gathered copy.
        pieces = [states[index, positions] if bool(labelled.all()) else states[index, positions][labelled]
                  for index, positions, labelled in spans]  # fmt: skip
        return cls(pieces, head)

    def signal(self, first_row: int, spec: dict[str, Any]) -> dict[str, np.ndarray]:
        """The stored signal of every labelled position, row after row (the rows numbered from
        ``first_row``, which seeds their draws)."""
        import torch

        points = None
        if spec["mode"] == "sampled":
            points = torch.cat([row_points(n, first_row + i, spec, self.device) for i, n in enumerate(self.positions)])
        vocab = spec["real_vocab_size"]
        head_rows, signal_rows = block_rows(vocab, self.device)
        # One buffer for every block's sampling weights: a fresh [positions, vocab] tensor per block
        # costs a CPU page faults on each first write (glibc maps and unmaps allocations this large; the
        # sampled signal ran 1.9x slower so), and an accelerator a second GiB of peak memory.
        workspace = None if points is None else torch.empty((signal_rows, padded_width(vocab)), device=self.device)
        parts, done = [], 0
        for block in position_blocks(self.pieces, head_rows):
            if self.head is None:
                logits = block[:, :vocab]
            else:
                bias = None if self.head.bias is None else self.head.bias[:vocab]
                logits = torch.nn.functional.linear(block.to(self.device), self.head.weight[:vocab], bias)
            for part in logits.split(signal_rows):
                values = part.float()  # the logits themselves when they are fp32: block_signal may overwrite them
                if spec["temperature"] != 1.0:
                    values = values.div_(spec["temperature"])
                block_points = None if points is None else points[done : done + len(part)]
                parts.append(block_signal(values, spec, block_points, workspace))
                done += len(part)
        if not parts:  # no labelled position in the whole batch: empty signal columns of the right types
            parts.append(block_signal(torch.zeros((0, vocab), device=self.device), spec, points))
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def fusable_head(teacher: Any) -> Any:
    """The teacher's lm_head when the build can apply it itself, else None (the teacher returns logits).

    Not when its architecture may post-process logits or its weights are sharded across ranks (the
    teacher's forward gathers a shard, a plain matmul would not).
    """
    from hf_capgap.losses.lm_head import choose_lm_head, parameter_sharding

    return choose_lm_head(teacher, "auto", parameter_sharding(teacher)).head


def block_rows(vocab: int, device: Any) -> tuple[int, int]:
    """(positions per lm_head matmul, positions per signal block) at ``vocab`` tokens on ``device``."""
    if device.type == "cpu":
        return max(1, CPU_HEAD_ELEMENTS // vocab), max(1, CPU_SIGNAL_ELEMENTS // vocab)
    rows = max(1, ACCELERATOR_BLOCK_ELEMENTS // vocab)
    return rows, rows


def position_blocks(pieces: Sequence[Any], size: int) -> Iterator[Any]:
    """The rows of ``pieces`` (tensors [n_i, ...]) in order, in blocks of ``size`` rows (the last may
    be shorter); a block inside one piece is a view, one across pieces a copy of ``size`` rows."""
    import torch

    pending: list[Any] = []
    filled = 0
    for piece in pieces:
        while len(piece):
            take = min(size - filled, len(piece))
            pending.append(piece[:take])
            piece, filled = piece[take:], filled + take
            if filled == size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, filled = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def row_points(positions: int, row_index: int, spec: dict[str, Any], device: Any) -> Any:
    """The sampling points of a row's labelled positions, from a generator seeded by (seed, row index):
    batch sizes, blocks and process counts never change which tokens a row gets."""
    import torch

    seed = np.random.SeedSequence([spec["seed"], row_index]).generate_state(1, np.uint64)[0]
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return sampling_points(positions, spec["k"], spec["sampler"], generator, device)


def sampling_points(positions: int, draws: int, sampler: str, generator: Any, device: Any) -> Any:
    """Ascending points in [0, 1) per position, [positions, draws]: where each draw reads the teacher's
    cumulative distribution.

    ``multinomial``: independent uniforms (i.i.d. draws). ``systematic``: one uniform u per position
    and the points (u + j) / draws, so a token of probability p is drawn floor(draws p) or
    ceil(draws p) times, draws p on average: unbiased like i.i.d. draws, but the likely tokens'
    counts barely vary (the variance left is that of the tokens below 1 / draws).
    """
    import torch

    if sampler == "multinomial":
        return torch.rand(positions, draws, generator=generator, device=device, dtype=torch.float64).sort(-1).values
    offsets = torch.rand(positions, 1, generator=generator, device=device, dtype=torch.float64)
    return (offsets + torch.arange(draws, device=device, dtype=torch.float64)) / draws


def block_signal(
    values: Any, spec: dict[str, Any], points: Any = None, workspace: Any = None
) -> dict[str, np.ndarray]:
    """The stored signal of a block of tempered teacher logits ``values`` [positions, vocab] (fp32),
    which it overwrites. Sampling writes its weights into ``workspace`` (fp32, at least [positions,
    padded_width(vocab)]) when given.

    Each pass over [positions, vocab] counts (with a small teacher they cost as much as its forward),
    so each mode makes as few as it can, and none allocates a [positions, vocab] temporary.
    """
    import torch

    if spec["mode"] == "sampled":
        positions, vocab = values.shape
        top = values.amax(dim=-1, keepdim=True)
        # Unnormalised probabilities, padded with zero weights to whole segments.
        if workspace is None:
            workspace = values.new_empty((positions, padded_width(vocab)))
        padded = workspace[:positions]
        padded[:, vocab:] = 0.0
        weights = torch.sub(values, top, out=padded[:, :vocab]).exp_()
        weighted_logits = values.mul_(weights).sum(dim=-1)
        drawn, total = inverse_cdf(padded, points)
        # H = -sum p log p with log p = z - top - log total, p = weights / total.
        entropy = top.squeeze(-1) + total.log() - weighted_logits / total
        ids, counts, sizes = distinct_draws(drawn)
        slots, repeat_counts, repeat_sizes = repeated_draws(counts, sizes)
        sizes = sizes.cpu().numpy().astype(np.uint8)
        return {
            "sample_id_gaps": encode_id_gaps(ids.cpu().numpy(), sizes),
            "sample_sizes": sizes,
            "repeat_slots": slots.cpu().numpy().astype(np.uint8),
            "repeat_counts": repeat_counts.cpu().numpy().astype(np.uint8),
            "repeat_sizes": repeat_sizes.cpu().numpy().astype(np.uint8),
            "entropy": _stored_values(entropy, spec),
        }
    if spec["mode"] == "topk":
        top_logits, ids = values.topk(spec["k"], dim=-1)
        weights = values.sub_(top_logits[:, :1]).exp_()  # unnormalised probabilities
        log_total = weights.sum(dim=-1, keepdim=True).log_()
        # Exact tail mass: the sum of the weights outside the top-k (no 1 - sum cancellation).
        tail = weights.scatter_(-1, ids, 0.0).sum(dim=-1, keepdim=True).log_().sub_(log_total)
        return {
            "topk_ids": _ids(ids, spec),
            "topk_logprobs": _stored_values(top_logits - top_logits[:, :1] - log_total, spec),
            "tail_logprob": tail.squeeze(-1).clamp_(min=LOGPROB_FLOOR).cpu().numpy(),
        }
    return {"logprobs": _stored_values(torch.log_softmax(values, dim=-1), spec)}


def padded_width(vocab: int) -> int:
    """``vocab`` rounded up to whole sampling segments."""
    return -(-vocab // SEGMENT) * SEGMENT


def inverse_cdf(weights: Any, points: Any) -> tuple[Any, Any]:
    """(ids [positions, draws] reading each position's cumulative distribution at ``points``, total
    weight [positions] in float64) for unnormalised ``weights`` [positions, n * SEGMENT] (fp32).

    One fp32 running sum over 32k weights rounds at ~1e-7 of the total, so tokens below that would be
    drawn at the wrong rate (up to ~1e-3 of the mass misplaced), and a float64 one costs several
    times the whole build on a CPU. So the sums run in two levels: float64 across the fp32 totals of
    segments of SEGMENT weights, then fp32 within only the segments a point falls in, rounding
    relative to the segment's own mass: at most ~SEGMENT * 6e-8 = 1.5e-5 of the mass is misplaced.
    """
    import torch

    positions, width = weights.shape
    segments = weights.view(positions, width // SEGMENT, SEGMENT)
    segment_mass = segments.sum(dim=-1).double()
    ends = segment_mass.cumsum(dim=-1)
    total = ends[:, -1:]
    # Each level reads strictly below its end and at or above its start, so a point that rounding
    # would put at an end still lands on a token of positive weight, never a zero-weight slot.
    targets = torch.minimum(points * total, _just_below(total))
    segment = torch.searchsorted(ends, targets, right=True)
    start = ends.gather(-1, segment) - segment_mass.gather(-1, segment)
    # The segments the points fall in, copied whole (a row-wise index_select: ~10x faster on a CPU
    # than a gather reading one index per weight).
    flat_segment = segment + torch.arange(positions, device=segment.device)[:, None] * segments.shape[1]
    within = segments.reshape(-1, SEGMENT).index_select(0, flat_segment.view(-1)).view(*segment.shape, SEGMENT)
    within = within.cumsum(dim=-1)
    residual = torch.minimum((targets - start).float().clamp_(min=0.0)[:, :, None], _just_below(within[:, :, -1:]))
    offset = torch.searchsorted(within, residual, right=True)
    return segment * SEGMENT + offset.squeeze(-1), total.squeeze(-1)


def _just_below(ends: Any) -> Any:
    """The largest values below positive ``ends`` (a cumulative sum's last entry)."""
    import torch

    return torch.nextafter(ends, torch.zeros_like(ends))


def distinct_draws(drawn: Any) -> tuple[Any, Any, Any]:
    """Sorted draws [positions, draws] as the distinct ids of each position (ascending), their
    counts, and how many distinct ids each position has (flat, position after position)."""
    import torch

    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    starts = first.reshape(-1).nonzero().squeeze(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([drawn.numel()])])
    return drawn.reshape(-1)[starts], ends - starts, first.sum(dim=-1)


def repeated_draws(counts: Any, sizes: Any) -> tuple[Any, Any, Any]:
    """The ids drawn more than once among flat ``counts`` (``sizes[p]`` of them for position p): their
    slots within their position, their counts, and how many each position has. Every other id was
    drawn once, so its count need not be stored."""
    import torch

    repeated = counts > 1
    starts = torch.cumsum(sizes, 0) - sizes
    slots = torch.arange(len(counts), device=counts.device) - torch.repeat_interleave(starts, sizes)
    position = torch.repeat_interleave(torch.arange(len(sizes), device=counts.device), sizes)
    return slots[repeated], counts[repeated], torch.bincount(position[repeated], minlength=len(sizes))


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
    rows: Sequence[Mapping[str, Any]],
    signal: Mapping[str, np.ndarray],
    positions: Sequence[int],
    spec: dict[str, Any],
    schema: pa.Schema,
) -> pa.RecordBatch:
    """The record batch of ``rows`` and their ``signal`` (flat over the rows' labelled positions,
    ``positions[i]`` of them for row i; sampled id gaps flat over their bytes, repeat slots and
    counts over the ids drawn more than once)."""
    lengths_of = {}
    if spec["mode"] == "sampled":
        row_of_position = np.repeat(np.arange(len(positions)), positions)
        repeats, ids = (np.bincount(row_of_position, weights=signal[name], minlength=len(positions)).astype(np.int64)
                        for name in ("repeat_sizes", "sample_sizes"))  # fmt: skip
        lengths_of.update(repeat_slots=repeats, repeat_counts=repeats)
        # A row's gap bytes end with the last byte of its last id: the ids[:i+1].sum()-th final byte.
        gap_ends = np.concatenate(([0], np.flatnonzero(signal["sample_id_gaps"] < 0x80) + 1))
        lengths_of["sample_id_gaps"] = np.diff(gap_ends[np.cumsum(ids)], prepend=0)
    arrays = []
    for field in schema:
        item_type = field.type.value_type
        leaf = item_type.value_type if pa.types.is_fixed_size_list(item_type) else item_type
        if field.name in ROW_COLUMNS:
            parts = [np.asarray(row[field.name]) for row in rows]
            values, lengths = np.concatenate(parts), [len(part) for part in parts]
        else:
            values = signal[field.name]
            lengths = lengths_of.get(field.name, positions)
        arrays.append(_list_array(values.astype(leaf.to_pandas_dtype(), copy=False), lengths, item_type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
