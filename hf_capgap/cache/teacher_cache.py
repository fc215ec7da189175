"""TeacherCache: run a teacher once over a dataset and keep its next-token distributions.

In a capacity-gap sweep every student is distilled from the same few teachers, so the teacher's
forward pass is paid once and reused for every epoch and every student. Storing only the top-k
log-probs biases the distillation target (Anshumann et al., ACL 2025, "Sparse Logit Sampling"), so a
cache keeps either the top-k *plus the exact tail mass*, unbiased samples (systematic by default:
the likely tokens' counts are all but exact, so few draws carry little noise), or the dense
distribution.

The cache stores the rows the trainer trains on (TRL's SFT preparation: text, messages,
prompt-completion or pre-tokenized; packing; completion / assistant masks) and the teacher signal of
each row's labelled positions only. Reading it back, a batch of rows is collated by the trainer's
own collator and the rows' signals are concatenated: they line up with the batch's labelled
positions (``batch["labels"][:, 1:].reshape(-1) != -100``) whatever the order, epoch or process.

On disk a cache is a directory of Arrow shards (memory-mapped on load) and a manifest written last::

    shard-00000.arrow ... shard-NNNNN.arrow   rows [j*R, (j+1)*R) of the prepared dataset, in order
    capgap_manifest.json                       settings, fingerprints, per-shard rows and sha256
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from transformers.utils import logging

from hf_capgap.cache.format import (
    FORMAT_VERSION,
    KIND,
    POSITION_COLUMN,
    ROW_COLUMNS,
    SIGNAL_COLUMNS,
    TEACHER_BATCH_KEYS,
    arrow_row_count,
    decode_id_gaps,
    index_within_groups,
    row_dicts,
)
from hf_capgap.errors import ConfigError
from hf_capgap.utils.artifacts import ArtifactError, file_sha256, read_manifest

if TYPE_CHECKING:
    import torch

    from hf_capgap.losses import TeacherSignal

logger = logging.get_logger(__name__)


class CachedRows(list):
    """A batch of cache rows: the plain rows (input_ids, labels, seq_lengths) for the base collator,
    and ``signal``, each signal column's values of all the rows concatenated in row order."""

    def __init__(self, rows: list[dict[str, np.ndarray]], signal: dict[str, np.ndarray]) -> None:
        super().__init__(rows)
        self.signal = signal


class CacheRows:
    """The cache as a map-style dataset that reads a whole batch with one Arrow take.

    ``datasets``' formatters would build one small array per position; a take of the batch's rows
    and one flatten per signal column yields the batch's signal already concatenated. The DataLoader
    calls ``__getitems__``; the cache collator accepts its :class:`CachedRows` like a list of rows.
    """

    def __init__(self, dataset: Any) -> None:
        self._rows = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        batch = self.__getitems__([index])
        return {**batch[0], **batch.signal}

    def __getitems__(self, indices: Sequence[int]) -> CachedRows:
        table = self._rows[list(indices)]
        rows = row_dicts(table.select([name for name in ROW_COLUMNS if name in table.column_names]))
        signal = {name: _flat_numpy(table.column(name)) for name in table.column_names if name not in ROW_COLUMNS}
        return CachedRows(rows, signal)


def _flat_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A list column of the taken rows as one array over their entries: [entries] or [entries, width]."""
    array = column.combine_chunks().flatten()
    width = array.type.list_size if pa.types.is_fixed_size_list(array.type) else None
    if width is not None:
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False)
    return values if width is None else values.reshape(-1, width)


def _writable(values: np.ndarray, dtype: type) -> np.ndarray:
    """One C-contiguous, writable array: Arrow buffers are read-only, and a tensor over read-only
    memory must not reach code that may write in place."""
    return np.require(values, dtype=dtype, requirements=["C", "W"])


def _long(values: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(_writable(values, np.int64))


def _float(values: np.ndarray, stored_as_bf16_bits: bool) -> torch.Tensor:
    import torch

    if stored_as_bf16_bits:
        return torch.from_numpy(_writable(values, np.uint16).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(_writable(values, np.float32))


class CacheCollator:
    """Collates cache rows exactly like ``base`` (the trainer's collator) and adds the ``teacher_*``
    tensors, one entry per labelled position of the batch. Rows without a signal (an evaluation set
    that was never cached) get ``base`` alone."""

    def __init__(self, cache: TeacherCache, base: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.cache, self.base = cache, base

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        from hf_capgap.data import count_labelled_positions

        if not len(features):
            raise ConfigError("the collator got an empty list of rows; a batch must hold at least one row.")
        names = SIGNAL_COLUMNS[self.cache.mode]
        if isinstance(features, CachedRows):
            rows, signal = list(features), features.signal
        elif all(name in features[0] for name in names):
            rows = [{k: v for k, v in row.items() if k in ROW_COLUMNS} for row in features]
            signal = {name: np.concatenate([np.asarray(row[name]) for row in features]) for name in names}
        else:
            return self.base(list(features))
        batch = self.base(rows)
        expected = count_labelled_positions(batch["labels"])
        stored = len(signal[POSITION_COLUMN[self.cache.mode]])
        if stored != expected:
            raise ArtifactError(
                f"the batch has {expected} labelled positions but its cached rows hold {stored}: the collator "
                f"does not mask labels like the one the cache was built with (padding_free="
                f"{self.cache.manifest['padding_free']}). Use the trainer's settings of the build, or rebuild it."
            )
        batch.update(self.cache.signal_tensors(signal))
        return batch


class TeacherCache:
    """A finished teacher cache: manifest, memory-mapped rows, a collator and the teacher signal."""

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
        tokenizer: Any = None,
        args: Any = None,
        mode: str = "topk",
        k: int = 64,
        temperature: float = 1.0,
        batch_size: int = 8,
        shard_tokens: int = 262144,
        dtype: str = "float16",
        seed: int = 0,
        sampler: str = "systematic",
        bytes_per_token: float | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> TeacherCache:
        """Run ``teacher`` (an HF causal LM, on its device, in its dtype) over ``dataset`` and write the
        cache at ``path``.

        ``dataset`` is any format ``trl.SFTTrainer`` takes; its rows are prepared by TRL with ``args``
        (the trainer's DistillationConfig / SFTConfig: max_length, packing, padding_free, loss masks;
        default: a default DistillationConfig), which needs ``tokenizer`` unless the rows are already
        tokenized, and ``formatting_func`` (SFTTrainer's: a row -> its text). Pass the trainer's own
        ``args`` and ``formatting_func``: the cache then holds exactly its training rows, and the
        manifest records the data settings a trainer on the cache is held to (:meth:`check_preparation`).
        The teacher distribution is normalised over the real vocabulary (``len(tokenizer)``, else
        the teacher's ``config.vocab_size``), the one the online teacher uses.

        ``mode``: ``topk`` keeps the ``k`` likeliest tokens and the exact tail mass; ``sampled`` keeps
        ``k`` draws (at most 255) per position as distinct ids and counts, unbiased for forward KL;
        ``dense`` keeps every log-prob (``k`` is ignored). ``sampler`` (sampled only): ``systematic``
        draws at k evenly spaced points of the teacher's cumulative distribution from one random
        offset, so a token of probability p gets floor(k p) or ceil(k p) draws (the likely tokens are
        all but exact); ``multinomial`` draws independently. Both are unbiased; systematic draws
        have less variance at the same bytes (bench/results/cache_training.md).

        ``bytes_per_token`` (sampled only) picks ``k`` instead: the most draws whose signal of the
        first 4,096 labelled positions, drawn and encoded as the build does, fits that many bytes per
        position as the manifest counts them (list offsets included; bench/results/cache_bytes.md
        tabulates draws -> bytes; 16 systematic draws of a 32,000-token teacher: ~26 B).
        ``batch_size``: rows per teacher forward, halved whenever a
        batch runs out of device memory, so a large one finds the largest batch that fits (a row's
        draws are seeded by its index, not by its batch).

        Resumable: rerunning after a crash keeps finished shards. Under accelerate/torch.distributed
        each rank builds its share of shards. A complete cache with the same settings is reused as
        is; one with other settings is refused unless ``overwrite=True``.
        """
        from hf_capgap.cache.build import build_cache

        build_cache(
            teacher,
            dataset,
            Path(path),
            tokenizer=tokenizer,
            args=args,
            mode=mode,
            k=k,
            temperature=temperature,
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            dtype=dtype,
            seed=seed,
            sampler=sampler,
            bytes_per_token=bytes_per_token,
            formatting_func=formatting_func,
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
        vocabulary_fingerprint: str | None = None,
        dataset_fingerprint: str | None = None,
        temperature: float | None = None,
        args: Any = None,
        tokenizer: Any = None,
        verify: bool = False,
    ) -> TeacherCache:
        """Open a cache, refusing one built from other inputs than the fingerprints given.

        ``dataset_fingerprint`` is ``hf_capgap.utils.artifacts.dataset_fingerprint`` of the *prepared*
        rows, ``vocabulary_fingerprint`` is ``hf_capgap.models.vocabulary.vocabulary_fingerprint``; ``args``
        (the trainer's config, with its ``tokenizer``) is held to the cache's data settings
        (:meth:`check_preparation`).
        Shards are checked cheaply (present, right size, right row count); ``verify=True`` also
        compares every shard's sha256 with the manifest. A cache of an older format is refused (rebuild it).
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
                "vocabulary_fingerprint": vocabulary_fingerprint,
                "dataset_fingerprint": dataset_fingerprint,
                "temperature": None if temperature is None else float(temperature),
            },
        )
        cache = cls(path, manifest)
        if args is not None:
            cache.check_preparation(args, tokenizer)
        cache._check_shards(checksums=verify)
        return cache

    def check_preparation(self, args: Any, tokenizer: Any = None) -> None:
        """Refuse a config (``trl.SFTConfig`` / DistillationConfig) that would prepare or collate other rows
        than the cached ones, naming each setting: a trainer on the cache trains on its rows as they were
        prepared, so a disagreeing ``max_length``, packing or loss mask would be silently ignored.

        ``tokenizer`` is the trainer's processing_class as given (before SFTTrainer applies ``eos_token`` and
        ``chat_template_path``): the eos appended to text rows and the chat template of chat rows are
        resolved from it; without it they are checked only where ``args`` fixes them.

        A cache built before the settings were recorded is checked on padding_free alone, with a
        warning: its rows still match a ``train_dataset`` only if their fingerprints do.
        """
        from hf_capgap.data import PREPARATION_ARGUMENTS, preparation_disagreements

        recorded = {**self.manifest.get("preparation", {}), "padding_free": self.manifest["padding_free"]}
        if "preparation" not in self.manifest:
            logger.warning(
                f"{self.path}: this cache predates hf_capgap's record of the data settings its rows were prepared "
                "with, so only padding_free is checked against the config (max_length, packing and the loss masks "
                "are not). Rebuild it with TeacherCache.build(..., args=<the trainer's config>) to have them checked."
            )
        found = preparation_disagreements(recorded, args, tokenizer)
        if not found:
            return
        problems = "; ".join(f"{field}: cache {have!r}, config {want!r}" for field, have, want in found)
        fixes = ", ".join(_config_fix(field, have) for field, have, _ in found)
        flag_names = {**{name: name for name in PREPARATION_ARGUMENTS}, "seed": "data_seed"}
        flags = [f"--{flag_names[field]} {want}" for field, _, want in found if field in flag_names]
        command = f", or hf-capgap cache build {' '.join(flags)}" if flags else ""
        raise ArtifactError(
            f"{self.path}: the cache's rows were prepared with other data settings than this config ({problems}); "
            f"training on it would ignore the config's. Set {fixes}, or rebuild the cache with this config and "
            f"tokenizer (TeacherCache.build(..., tokenizer=<the trainer's>, args=<this config>){command})."
        )

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
                raise ArtifactError(f"{file} does not match its manifest sha256 (corrupted); rebuild the cache.")
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
    def real_vocab_size(self) -> int:
        """The vocabulary the cached distributions are normalised over; every cached id is below it."""
        return int(self.manifest["real_vocab_size"])

    @property
    def bytes_per_token(self) -> float:
        """On-disk bytes of the teacher signal (not input_ids/labels) per labelled position."""
        return self.manifest["signal_bytes"] / max(1, self.manifest["num_positions"])

    @property
    def dataset(self) -> Any:
        """All shards as one memory-mapped ``datasets.Dataset``, rows in dataset order."""
        if self._dataset is None:
            import datasets

            shards = [datasets.Dataset.from_file(str(self.path / s["file"])) for s in self.manifest["shards"]]
            self._dataset = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
        return self._dataset

    def rows(self) -> CacheRows:
        """The cached rows in order, as a map-style dataset reading each batch with one Arrow take."""
        return CacheRows(self.dataset)

    def collator(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> CacheCollator:
        """A collator that batches rows like ``base`` (``hf_capgap.data.sft.make_collator``) and adds
        the ``teacher_*`` tensors of the batch's labelled positions."""
        return CacheCollator(self, base)

    def signal_tensors(self, signal: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The ``teacher_*`` batch tensors from signal columns concatenated over labelled positions."""
        keys = TEACHER_BATCH_KEYS[self.mode]
        bf16 = self.manifest["dtype"] == "bfloat16"
        if self.mode == "topk":
            return {
                keys[0]: _long(signal["topk_ids"]),
                keys[1]: _float(signal["topk_logprobs"], bf16),
                keys[2]: _float(signal["tail_logprob"], False),
            }
        if self.mode == "sampled":
            ids, counts = padded_samples(signal)
            return {keys[0]: _long(ids), keys[1]: _float(counts, False), keys[2]: _float(signal["entropy"], bf16)}
        return {keys[0]: _float(signal["logprobs"], bf16)}

    def teacher_signal(self, batch: Mapping[str, Any]) -> TeacherSignal:
        """The teacher signal of a batch made by :meth:`collator`: one row per labelled position."""
        from hf_capgap.losses import DenseTeacher, SampledTeacher, TopKTeacher

        keys = TEACHER_BATCH_KEYS[self.mode]
        missing = [key for key in keys if key not in batch]
        if missing:
            raise ConfigError(
                f"the batch has no {missing[0]!r}: collate cache rows with TeacherCache.collator(base_collator)."
            )
        values = [batch[key] for key in keys]
        if self.mode == "topk":
            return TopKTeacher(*values)
        if self.mode == "sampled":
            return SampledTeacher(values[0], values[1], entropy=values[2])
        return DenseTeacher(values[0], tempered_logprobs=True)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TeacherCache({str(self.path)!r}, mode={m['mode']!r}, k={m['k']}, sequences={m['num_sequences']}, "
            f"bytes_per_token={self.bytes_per_token:.1f})"
        )


def padded_samples(signal: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A sampled signal's distinct ids (coded gaps, ``sample_sizes[p]`` ids for position p) and their
    counts (1 unless a repeat slot says otherwise) as [positions, max size] arrays padded with id 0
    and count 0, the shape the loss gathers with."""
    sizes = signal["sample_sizes"].astype(np.int64)
    ids = decode_id_gaps(signal["sample_id_gaps"], sizes)
    width = int(sizes.max()) if len(sizes) else 0
    position = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.cumsum(sizes) - sizes
    slot = index_within_groups(sizes)
    counts = np.ones(len(ids), dtype=np.float32)
    repeated_at = np.repeat(starts, signal["repeat_sizes"].astype(np.int64)) + signal["repeat_slots"]
    counts[repeated_at] = signal["repeat_counts"]
    padded_ids = np.zeros((len(sizes), width), dtype=np.int64)
    padded_counts = np.zeros((len(sizes), width), dtype=np.float32)
    padded_ids[position, slot] = ids
    padded_counts[position, slot] = counts
    return padded_ids, padded_counts


def _config_fix(field: str, recorded: Any) -> str:
    """What to set in the trainer's config (or tokenizer) to match the cache's recorded ``field``."""
    if field == "chat_template_sha256":
        return f"the chat template the cache was built with (sha256 {recorded}: that tokenizer or chat_template_path)"
    if field == "skip_prepare_dataset":
        return f"dataset_kwargs={{'skip_prepare_dataset': {recorded!r}}} in the config"
    return f"{field}={recorded!r} in the config"
