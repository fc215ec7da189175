"""The on-disk format of a teacher cache: constants, shard naming and the Arrow schema.

Imported by ``teacher_cache`` (reading), ``build`` and its steps (writing) and ``encode`` (teacher signal
to Arrow), none of which import each other's internals, so they never form an import circle.

A shard holds one Arrow row per dataset row. The teacher signal covers only the row's *labelled*
positions (position t is kept when the collated label of token t + 1 is not -100), concatenated in
position order, so a batch of rows read back and concatenated row after row lines up with
``batch["labels"][:, 1:].reshape(-1) != -100`` of the same rows collated by the same collator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hf_capgap.errors import ConfigError
from hf_capgap.utils.artifacts import ArtifactError

KIND = "teacher_cache"
FORMAT_VERSION = 4
"""2: variable-length rows, signal only at labelled positions, sampled ids + counts without padding
slots, teacher entropy instead of per-sample log-probs. 3: a sampled id's count is implicit when it
was drawn once (85-95% of them), stored only for the ids drawn more than once. 4: a position's
sampled ids are stored as the varint-coded gaps between them (:func:`encode_id_gaps`), 1.3-1.5
bytes each on average at 32,000 tokens instead of 2 (4 above 65,536 tokens). Older caches are
refused (rebuild). The manifest records the sampler (systematic or multinomial); the layout is the
same for both."""

MODES = ("topk", "sampled", "dense")
DTYPES = ("float16", "bfloat16")
SAMPLERS = ("systematic", "multinomial")
"""How a sampled cache draws: one uniform offset and evenly spaced points on the teacher's cumulative
distribution (systematic), or independent draws (multinomial); both unbiased for forward KL."""
MAX_DRAWS = 255
"""Sample counts are stored as uint8, so a sampled cache draws at most 255 tokens per position."""

SAMPLED_POSITION_BYTES = 4
"""Sampled storage per position besides its ids: uint8 numbers of distinct and of repeated ids and
the fp16 teacher entropy."""
REPEAT_BYTES = 2
"""A uint8 slot and a uint8 count for each id drawn more than once."""
VARINT_BITS = 7
"""Payload bits per byte of a coded id gap; the high bit says another byte of the same gap follows."""

LOGPROB_FLOOR = -1.0e4
"""Stored in place of log(0) (e.g. the tail when the top-k hold all the mass): finite, so fp16/bf16
storage and downstream arithmetic never meet inf or nan, and exp(LOGPROB_FLOOR) is exactly 0."""

ROW_COLUMNS = ("input_ids", "labels", "seq_lengths")
"""Columns of the prepared dataset row a cache keeps (seq_lengths only for packed datasets)."""

SIGNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "topk": ("topk_ids", "topk_logprobs", "tail_logprob"),
    "sampled": ("sample_id_gaps", "sample_sizes", "repeat_slots", "repeat_counts", "repeat_sizes", "entropy"),
    "dense": ("logprobs",),
}
"""Per row, each a list over the row's labelled positions (sampled id gaps: the bytes coding their
distinct draws; repeat slots and counts: over the ids drawn more than once)."""

POSITION_COLUMN = {"topk": "tail_logprob", "sampled": "entropy", "dense": "logprobs"}
"""The signal column with exactly one entry per labelled position, which counts them."""

TEACHER_BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "topk": ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob"),
    "sampled": ("teacher_sample_ids", "teacher_sample_counts", "teacher_entropy"),
    "dense": ("teacher_logprobs",),
}
"""Keys the cache collator adds to a batch; each has one entry per labelled position of the batch."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def id_dtype(real_vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id of the real vocabulary."""
    for name, bits in (("uint8", 8), ("uint16", 16), ("uint32", 32)):
        if real_vocab_size <= 1 << bits:
            return name
    raise ConfigError(f"a vocabulary of {real_vocab_size} tokens does not fit 32-bit ids.")


@dataclass(frozen=True)
class ShardPlan:
    """Fixed row ranges: shard j covers rows [j*rows_per_shard, (j+1)*rows_per_shard)."""

    num_rows: int
    rows_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    def rows(self, index: int) -> tuple[int, int]:
        start = index * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.num_rows)


def value_type(spec: dict[str, Any]) -> pa.DataType:
    """fp16 as Arrow half floats; bf16 (which Arrow lacks) as its raw bit pattern in uint16."""
    return pa.float16() if spec["dtype"] == "float16" else pa.uint16()


def shard_schema(spec: dict[str, Any]) -> pa.Schema:
    """One list per column and row; signal lists hold one entry per labelled position of the row."""
    ids = pa.from_numpy_dtype(spec["id_dtype"])
    value = value_type(spec)
    fields = [pa.field("input_ids", pa.list_(ids)), pa.field("labels", pa.list_(pa.int32()))]
    if spec["has_seq_lengths"]:
        fields.append(pa.field("seq_lengths", pa.list_(pa.int32())))
    if spec["mode"] == "topk":
        fields += [
            pa.field("topk_ids", pa.list_(pa.list_(ids, spec["k"]))),
            pa.field("topk_logprobs", pa.list_(pa.list_(value, spec["k"]))),
            pa.field("tail_logprob", pa.list_(pa.float32())),
        ]
    elif spec["mode"] == "sampled":
        fields += [
            pa.field("sample_id_gaps", pa.list_(pa.uint8())),  # distinct drawn ids (encode_id_gaps)
            pa.field("sample_sizes", pa.list_(pa.uint8())),  # distinct ids of each position
            pa.field("repeat_slots", pa.list_(pa.uint8())),  # where, among its position's ids, one drawn twice+ is
            pa.field("repeat_counts", pa.list_(pa.uint8())),  # and how often it was drawn (any other id: once)
            pa.field("repeat_sizes", pa.list_(pa.uint8())),  # ids drawn more than once at each position
            pa.field("entropy", pa.list_(value)),  # teacher entropy: the KL value without log-probs
        ]
    else:
        fields.append(pa.field("logprobs", pa.list_(pa.list_(value, spec["real_vocab_size"]))))
    return pa.schema(fields)


def signal_bytes(table: pa.Table | pa.RecordBatch, mode: str) -> int:
    """Bytes of the teacher signal columns of ``table`` as Arrow stores them: each column's values and
    its list offsets (4 bytes per row). The manifest's ``signal_bytes`` and a ``bytes_per_token``
    budget both count this, so a budget is met as the manifest counts it."""
    return sum(table.column(name).nbytes for name in SIGNAL_COLUMNS[mode])


def row_dicts(table: pa.Table) -> list[dict[str, np.ndarray]]:
    """The rows of a table of list columns as dicts of int64 arrays (what a collator is given), split
    from each column's flat values by its offsets instead of converting row by row."""
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
        columns[name] = np.split(values[offsets[0] : offsets[-1]], offsets[1:-1] - offsets[0])
    return [{name: parts[i] for name, parts in columns.items()} for i in range(table.num_rows)]


def arrow_row_count(path: Path) -> int:
    """Rows in an Arrow IPC stream; raises ArtifactError when the file is unreadable or truncated."""
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().num_rows
    except (pa.ArrowInvalid, OSError) as err:
        raise ArtifactError(f"{path} is not a readable Arrow shard ({err}); rebuild the cache.") from err


def index_within_groups(sizes: np.ndarray) -> np.ndarray:
    """For flat entries in consecutive groups of ``sizes`` entries, each entry's index in its group."""
    sizes = sizes.astype(np.int64)
    return np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def encode_id_gaps(ids: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Distinct ascending ids, ``sizes[p]`` of them for position p (flat, position after position), as
    bytes: each id's gap to the previous id of its position minus one (the first: the id itself), in
    little-endian base 128 (LEB128). Sorted draws sit close together, and a teacher's likely tokens
    have low ids in a BPE vocabulary, so most gaps take one byte and few take more than two."""
    ids, sizes = ids.astype(np.int64), sizes.astype(np.int64)
    previous = np.empty_like(ids)
    previous[1:] = ids[:-1]
    previous[(np.cumsum(sizes) - sizes)[sizes > 0]] = -1
    gaps = ids - previous - 1
    lengths = 1 + sum((gaps >> (VARINT_BITS * j) > 0).astype(np.int64) for j in range(1, 5))
    byte_index = index_within_groups(lengths)
    payload = (np.repeat(gaps, lengths) >> (VARINT_BITS * byte_index)) & 0x7F
    follows = byte_index < np.repeat(lengths - 1, lengths)
    return (payload | (follows.astype(np.int64) << VARINT_BITS)).astype(np.uint8)


def decode_id_gaps(codes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The flat ids :func:`encode_id_gaps` coded (int64), ``sizes[p]`` of them for position p."""
    codes, sizes = codes.astype(np.int64), sizes.astype(np.int64)
    last = codes < 0x80  # the last byte of each gap
    if int(last.sum()) != int(sizes.sum()) or (len(codes) and not last[-1]):
        raise ArtifactError(
            f"the sampled ids hold {int(last.sum())} coded gaps where the positions count {int(sizes.sum())} ids "
            "(a corrupted shard); run TeacherCache.verify() and rebuild the cache."
        )
    if not len(codes):
        return codes
    gap_index = np.cumsum(last) - last
    first_byte = np.flatnonzero(np.concatenate(([True], last[:-1])))
    shifts = VARINT_BITS * (np.arange(len(codes)) - first_byte[gap_index])
    steps = np.add.reduceat((codes & 0x7F) << shifts, first_byte) + 1
    running = np.cumsum(steps)
    starts = (np.cumsum(sizes) - sizes)[sizes > 0]
    before = np.repeat(running[starts] - steps[starts], sizes[sizes > 0])
    return running - before - 1


def sampled_bytes_bound(draws: int, vocab: int) -> int:
    """The most bytes one position of a sampled cache can take: d distinct ids, r <= min(d, draws - d)
    of them drawn more than once. The gaps of a position sum to less than ``vocab``, so at most
    vocab >> 7j of its d gaps take more than j bytes."""

    def coded(distinct: int) -> int:
        return sum(min(distinct, vocab >> (VARINT_BITS * j)) for j in range(5))

    return SAMPLED_POSITION_BYTES + max(coded(d) + REPEAT_BYTES * min(d, draws - d) for d in range(1, draws + 1))
