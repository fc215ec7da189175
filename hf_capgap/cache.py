"""TeacherCache: run a teacher once over a packed dataset and keep its next-token distributions.

In a capacity-gap sweep every student is distilled from the same few teachers, so the teacher's
forward pass is paid once and reused for every epoch and every student. Storing only the top-k
log-probs biases the distillation target (Anshumann et al., ACL 2025, "Sparse Logit Sampling"), so a
cache keeps either the top-k *plus the exact tail mass*, unbiased samples, or the dense distribution.

On disk a cache is a directory of Arrow shards (memory-mapped on load) and a manifest written last::

    shard-00000.arrow ... shard-NNNNN.arrow   rows [j*R, (j+1)*R) of the dataset, in order
    capgap_manifest.json                       settings, fingerprints, per-shard rows and sha256

Per row of length L the cache holds L-1 positions: position t is the teacher's distribution over
the token after ``input_ids[t]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from hf_capgap.artifacts import ArtifactError, file_sha256, read_manifest

if TYPE_CHECKING:
    import torch

KIND = "teacher_cache"
FORMAT_VERSION = 1
MODES = ("topk", "sampled", "dense")
DTYPES = ("float16", "bfloat16")

LOGPROB_FLOOR = -1.0e4
"""Stored in place of log(0) (e.g. the tail when the top-k hold all the mass): finite, so fp16/bf16
storage and downstream arithmetic never meet inf or nan, and exp(LOGPROB_FLOOR) is exactly 0."""

SIGNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "topk": ("topk_ids", "topk_logprobs", "tail_logprob"),
    "sampled": ("sample_ids", "sample_counts", "sample_logprobs"),
    "dense": ("logprobs",),
}
CACHE_COLUMNS: tuple[str, ...] = (
    "input_ids",
    "labels",
    *(name for columns in SIGNAL_COLUMNS.values() for name in columns),
)
"""Every column a cache row may hold; keep them past ``remove_unused_columns``."""

TEACHER_BATCH_KEYS: dict[str, tuple[str, ...]] = {
    "topk": ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob"),
    "sampled": ("teacher_sample_ids", "teacher_sample_counts", "teacher_sample_logprobs"),
    "dense": ("teacher_logprobs",),
}
"""Keys :meth:`TeacherCache.collate` adds to a batch, next to input_ids/attention_mask/labels."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


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


def arrow_row_count(path: Path) -> int:
    """Rows in an Arrow IPC stream; raises ArtifactError when the file is unreadable or truncated."""
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().num_rows
    except (pa.ArrowInvalid, OSError) as err:
        raise ArtifactError(f"{path} is not a readable Arrow shard ({err}); rebuild the cache.") from err


class CacheColumns(dict):
    """A batch of cache rows as whole columns (``[rows, ...]`` numpy arrays), made by :class:`CacheRows`."""


class CacheRows:
    """The cache as a map-style dataset that reads a whole batch with one Arrow take.

    ``datasets``' numpy formatter turns the nested signal lists into arrays position by position
    (about a thousand small arrays per batch); the columns are fixed-size lists, so flattening each
    column of the taken table yields its ``[rows, positions, k]`` array at once. The DataLoader calls
    ``__getitems__``, whose :class:`CacheColumns` :meth:`TeacherCache.collate` accepts like a list of rows.
    """

    def __init__(self, dataset: Any) -> None:
        self._rows = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: values[0] for name, values in self.__getitems__([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> CacheColumns:
        table = self._rows[list(indices)]
        return CacheColumns({name: _fixed_size_numpy(table.column(name)) for name in table.column_names})


def _fixed_size_numpy(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(shape)


def _array(values: Sequence[Any] | np.ndarray, dtype: type) -> np.ndarray:
    """Rows or a column as one C-contiguous, writable array: Arrow buffers are read-only, and a
    tensor over read-only memory must not reach code that may write in place."""
    stacked = values if isinstance(values, np.ndarray) else np.stack([np.asarray(v) for v in values])
    return np.require(stacked, dtype=dtype, requirements=["C", "W"])


def _as_long(values: Sequence[Any] | np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(_array(values, np.int64))


def _as_float(values: Sequence[Any] | np.ndarray, stored_as_bf16_bits: bool) -> torch.Tensor:
    import torch

    if stored_as_bf16_bits:
        return torch.from_numpy(_array(values, np.uint16).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(_array(values, np.float32))


class TeacherCache:
    """A finished teacher cache: manifest, memory-mapped rows and a collator for the trainer."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._dataset = None

    @classmethod
    def build(
        cls,
        teacher: Any,
        dataset: Any,
        path: str | os.PathLike,
        *,
        mode: str = "topk",
        k: int = 64,
        temperature: float = 1.0,
        batch_size: int = 8,
        shard_tokens: int = 262144,
        tokenizer: Any = None,
        dtype: str = "float16",
        seed: int = 0,
        progress: bool = True,
        overwrite: bool = False,
    ) -> TeacherCache:
        """Run ``teacher`` (an HF causal LM) over a packed ``dataset`` and write the cache at ``path``.

        Resumable: rerunning after a crash keeps finished shards. Under accelerate/torch.distributed
        each rank builds its share of shards. A complete cache with the same settings is reused as
        is; one with other settings is refused unless ``overwrite=True``. ``k`` is ignored in
        ``dense`` mode, which keeps the whole vocabulary.
        """
        from hf_capgap.cache_build import build_cache

        build_cache(
            teacher,
            dataset,
            Path(path),
            mode=mode,
            k=k,
            temperature=temperature,
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            tokenizer=tokenizer,
            dtype=dtype,
            seed=seed,
            progress=progress,
            overwrite=overwrite,
        )
        return cls.load(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        teacher_fingerprint: str | None = None,
        tokenizer_fingerprint: str | None = None,
        dataset_fingerprint: str | None = None,
        temperature: float | None = None,
        verify: bool = False,
    ) -> TeacherCache:
        """Open a cache, refusing one built from other inputs than the fingerprints given.

        Shards are checked cheaply (present, right size, right row count); ``verify=True`` also
        compares every shard's sha256 with the manifest.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no teacher cache at {path}; build one with TeacherCache.build.")
        manifest = read_manifest(
            path,
            KIND,
            FORMAT_VERSION,
            expected={
                "teacher_fingerprint": teacher_fingerprint,
                "tokenizer_fingerprint": tokenizer_fingerprint,
                "dataset_fingerprint": dataset_fingerprint,
                "temperature": None if temperature is None else float(temperature),
            },
        )
        cache = cls(path, manifest)
        cache._check_shards(checksums=verify)
        return cache

    def verify(self) -> None:
        """Check every shard's checksum, size and row count against the manifest."""
        self._check_shards(checksums=True)

    def _check_shards(self, *, checksums: bool) -> None:
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise ArtifactError(f"{file} is listed in the manifest but missing; rebuild the cache.")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise ArtifactError(
                    f"{file} has {size} bytes, the manifest records {shard['bytes']} (truncated or "
                    "modified); rebuild the cache."
                )
            if checksums and file_sha256(file) != shard["sha256"]:
                raise ArtifactError(
                    f"{file} does not match its manifest sha256 (corrupted); rebuild the cache."
                )
            rows = arrow_row_count(file)
            if rows != shard["num_rows"]:
                raise ArtifactError(
                    f"{file} holds {rows} rows, the manifest records {shard['num_rows']}; rebuild the cache."
                )

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def bytes_per_token(self) -> float:
        """On-disk bytes of the teacher signal (not input_ids/labels) per predicted position."""
        return self.manifest["signal_bytes"] / self.manifest["num_positions"]

    @property
    def dataset(self) -> Any:
        """All shards as one memory-mapped ``datasets.Dataset``, rows in dataset order."""
        if self._dataset is None:
            import datasets

            shards = [datasets.Dataset.from_file(str(self.path / s["file"])) for s in self.manifest["shards"]]
            self._dataset = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
        return self._dataset

    def collate(self, features: list[Mapping[str, Any]] | CacheColumns) -> dict[str, torch.Tensor]:
        """Batch cache rows (a list of rows, or :class:`CacheColumns`) into tensors: the model
        inputs plus the ``teacher_*`` signal."""
        import torch

        if not len(features):
            raise ValueError("collate got an empty list of features; the batch must hold at least one row.")
        if isinstance(features, CacheColumns):
            columns: Mapping[str, Any] = features
        else:
            columns = {name: [row[name] for row in features] for name in features[0]}
        input_ids = _as_long(columns["input_ids"])
        has_labels = columns.get("labels") is not None and columns["labels"][0] is not None
        labels = _as_long(columns["labels"]) if has_labels else input_ids.clone()
        batch: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
        }
        bf16 = self.manifest["dtype"] == "bfloat16"
        if self.mode == "topk":
            batch["teacher_topk_ids"] = _as_long(columns["topk_ids"])
            batch["teacher_topk_logprobs"] = _as_float(columns["topk_logprobs"], bf16)
            batch["teacher_tail_logprob"] = _as_float(columns["tail_logprob"], False)
        elif self.mode == "sampled":
            batch["teacher_sample_ids"] = _as_long(columns["sample_ids"])
            batch["teacher_sample_counts"] = _as_float(columns["sample_counts"], False)
            batch["teacher_sample_logprobs"] = _as_float(columns["sample_logprobs"], bf16)
        else:
            batch["teacher_logprobs"] = _as_float(columns["logprobs"], bf16)
        return batch

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TeacherCache({str(self.path)!r}, mode={m['mode']!r}, k={m['k']}, sequences={m['num_sequences']}, "
            f"bytes_per_token={self.bytes_per_token:.1f})"
        )
