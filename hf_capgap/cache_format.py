"""The on-disk format of a teacher cache: constants, shard naming and the Arrow schema.

Imported by ``cache`` (reading), ``cache_build`` (writing) and ``cache_encode`` (teacher signal to
Arrow), none of which import each other's internals, so the three never form an import circle.

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

from hf_capgap.artifacts import ArtifactError

KIND = "teacher_cache"
FORMAT_VERSION = 3
"""2: variable-length rows, signal only at labelled positions, sampled ids + counts without padding
slots, teacher entropy instead of per-sample log-probs. 3: a sampled id's count is implicit when it
was drawn once (85-95% of them), stored only for the ids drawn more than once. Older caches are
refused (rebuild). The manifest records the sampler (systematic or multinomial); the layout is the
same for both."""

MODES = ("topk", "sampled", "dense")
DTYPES = ("float16", "bfloat16")
SAMPLERS = ("systematic", "multinomial")
"""How a sampled cache draws: one uniform offset and evenly spaced points on the teacher's cumulative
distribution (systematic), or independent draws (multinomial); both unbiased for forward KL."""
MAX_DRAWS = 255
"""Sample counts are stored as uint8, so a sampled cache draws at most 255 tokens per position."""

LOGPROB_FLOOR = -1.0e4
"""Stored in place of log(0) (e.g. the tail when the top-k hold all the mass): finite, so fp16/bf16
storage and downstream arithmetic never meet inf or nan, and exp(LOGPROB_FLOOR) is exactly 0."""

ROW_COLUMNS = ("input_ids", "labels", "seq_lengths")
"""Columns of the prepared dataset row a cache keeps (seq_lengths only for packed datasets)."""

SIGNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "topk": ("topk_ids", "topk_logprobs", "tail_logprob"),
    "sampled": ("sample_ids", "sample_sizes", "repeat_slots", "repeat_counts", "repeat_sizes", "entropy"),
    "dense": ("logprobs",),
}
"""Per row, each a list over the row's labelled positions (sampled ids: over their distinct draws;
repeat slots and counts: over the ids drawn more than once)."""

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
    raise ValueError(f"a vocabulary of {real_vocab_size} tokens does not fit 32-bit ids.")


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
            pa.field("sample_ids", pa.list_(ids)),  # distinct drawn ids, ascending, position after position
            pa.field("sample_sizes", pa.list_(pa.uint8())),  # distinct ids of each position
            pa.field("repeat_slots", pa.list_(pa.uint8())),  # where, among its position's ids, one drawn twice+ is
            pa.field("repeat_counts", pa.list_(pa.uint8())),  # and how often it was drawn (any other id: once)
            pa.field("repeat_sizes", pa.list_(pa.uint8())),  # ids drawn more than once at each position
            pa.field("entropy", pa.list_(value)),  # teacher entropy: the KL value without log-probs
        ]
    else:
        fields.append(pa.field("logprobs", pa.list_(pa.list_(value, spec["real_vocab_size"]))))
    return pa.schema(fields)


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
