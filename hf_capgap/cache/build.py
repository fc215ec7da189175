"""Building a teacher cache: validate, prepare the rows, run the teacher shard by shard, manifest last.

A build is resumable and can be spread over processes. Shard j always covers the same rows, is
written under a temporary name and renamed only once complete, so a rerun keeps finished shards and
redoes the rest. Under accelerate / torch.distributed with world size W, rank r builds the shards
with j % W == r and rank 0 writes the manifest after a barrier: the files equal a one-process build.
A teacher sharded across the ranks (FSDP, DeepSpeed ZeRO-3) runs each forward as a collective, so
there the ranks agree first on the most batches any of them has, and the others run spare forwards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from hf_capgap.utils.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    atomic_write_json,
    dataset_fingerprint,
    file_sha256,
    model_fingerprint,
    temporary_prefix,
    write_manifest,
)
from hf_capgap.utils.processes import ProcessGroup
from hf_capgap.cache.encode import LabelledStates, encode_batch, encode_states
from hf_capgap.cache.format import (
    DTYPES,
    FORMAT_VERSION,
    KIND,
    LOGPROB_FLOOR,
    MAX_DRAWS,
    MODES,
    POSITION_COLUMN,
    ROW_COLUMNS,
    SAMPLED_POSITION_BYTES,
    SAMPLERS,
    ShardPlan,
    arrow_row_count,
    id_dtype,
    row_dicts,
    shard_name,
    shard_schema,
    signal_bytes,
)
from hf_capgap.data import (
    has_labelled_position,
    make_collator,
    prepare_and_record,
    rows_holding_positions,
    uses_padding_free,
)
from hf_capgap.models import check_logits_cover, vocabulary_fingerprint

T = TypeVar("T")

BUDGET_POSITIONS = 4096
"""Labelled positions a ``bytes_per_token`` budget is measured on: the first rows that hold them,
whatever the batch size, so a rerun with another batch_size picks the same draws."""
SPEC_NAME = ".build_spec.json"
"""Settings of an unfinished build, so a rerun with other inputs cannot mix its shards in."""


def build_cache(
    teacher: Any,
    dataset: Any,
    path: Path,
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
) -> None:
    """Write (or finish) the cache at ``path``; every input is checked before the teacher runs."""
    from hf_capgap.losses.lm_head import parameter_sharding

    _check_options(mode, k, temperature, batch_size, shard_tokens, dtype, sampler)
    if bytes_per_token is not None and (mode != "sampled" or not bytes_per_token >= SAMPLED_POSITION_BYTES + 1):
        raise ValueError(
            f"bytes_per_token={bytes_per_token!r} needs mode='sampled' and at least {SAMPLED_POSITION_BYTES + 1} "
            "bytes (one draw); top-k and dense caches have fixed sizes (4k + 4 and 2 x vocabulary bytes)."
        )
    args = args if args is not None else default_preparation_args()
    prepared, preparation = prepare_rows(dataset, tokenizer, args, formatting_func)
    rows = prepared.select_columns([c for c in ROW_COLUMNS if c in prepared.column_names])
    real_vocab = _real_vocab_size(teacher, tokenizer)
    num_tokens = _check_rows(rows, real_vocab)
    collator = make_collator(tokenizer, args)
    if mode == "topk" and k > real_vocab:
        raise ValueError(
            f"k={k} exceeds the real vocabulary ({real_vocab} tokens); use k <= {real_vocab} or mode='dense'."
        )
    spec = {
        "mode": mode,
        "k": real_vocab if mode == "dense" else k,
        "draws": k if mode == "sampled" else None,
        "sampler": sampler if mode == "sampled" else None,
        "temperature": float(temperature),
        "dtype": dtype,
        "seed": seed,
        "real_vocab_size": real_vocab,
        "id_dtype": id_dtype(real_vocab),
        "padding_free": uses_padding_free(args),
        "preparation": preparation,
        "has_seq_lengths": "seq_lengths" in rows.column_names,
        "num_sequences": len(rows),
        "num_tokens": num_tokens,
        "rows_per_shard": max(1, shard_tokens * len(rows) // num_tokens),
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "teacher_fingerprint": model_fingerprint(teacher),
        "vocabulary_fingerprint": None if tokenizer is None else vocabulary_fingerprint(tokenizer),
        "dataset_fingerprint": dataset_fingerprint(prepared),
    }
    state = ProcessGroup.current()
    # A teacher sharded across ranks runs each forward as a collective: every rank must run as many,
    # and none may retry one alone.
    lockstep = state.num_processes > 1 and parameter_sharding(teacher) is not None
    fitting = FittingBatchSize(batch_size, halve=not lockstep)
    if bytes_per_token is not None:
        first = row_dicts(rows.with_format("arrow")[: rows_holding_positions(rows, BUDGET_POSITIONS)])
        draws = draws_for_budget(teacher, first, collator, spec, bytes_per_token, fitting)
        # Every rank measures the same rows, but one that halved its batches may round the bytes
        # differently: all build with the fewest draws any rank measured, which fits the budget on each.
        draws = state.fewest_over_ranks(draws, next(teacher.parameters()).device)
        spec.update(k=draws, draws=draws)
    found = _inspect_directory(path, spec, overwrite=overwrite)
    if found == "complete":
        if state.is_main_process:
            _record_preparation(path, spec)
        state.wait_for_everyone()
        return
    state.wait_for_everyone()
    if state.is_main_process:
        _claim_directory(path, stale=found == "stale", spec=spec)
    state.wait_for_everyone()
    plan = ShardPlan(spec["num_sequences"], spec["rows_per_shard"])
    own = [j for j in range(plan.num_shards) if j % state.num_processes == state.process_index]
    todo = [j for j in own if not _shard_is_complete(path / shard_name(j), plan, j)]
    spare = 0
    if lockstep:  # counted before any forward, which the other ranks' count exchange would block
        own_batches = _batch_count(plan, todo, fitting.rows)
        spare = state.most_over_ranks(own_batches, next(teacher.parameters()).device) - own_batches
    _build_shards(teacher, rows, collator, path, spec, plan, todo, fitting, progress and state.is_main_process)
    _join_other_ranks_forwards(teacher, rows, collator, spare)
    state.wait_for_everyone()
    if state.is_main_process:
        teacher_name = getattr(teacher, "name_or_path", "") or teacher.config.name_or_path
        _write_final_manifest(path, spec, plan, teacher_name)
    state.wait_for_everyone()


class FittingBatchSize:
    """Rows per teacher forward: the build's ``batch_size``, halved whenever a batch runs out of memory
    (accelerate's test for such errors), and kept at the size that fit for the rest of the build.

    So a ``batch_size`` too large for the device costs one failed batch, not the build, and a large one
    finds the largest batch that fits. The rows a shard holds and the seed of a row's draws (its index)
    do not depend on the batches, so a build that halved equals one run at the smaller size.
    """

    def __init__(self, rows: int, *, halve: bool = True) -> None:
        self.rows, self.halve = rows, halve

    def batches(self, start: int, end: int, work: Callable[[int, int], T]) -> Iterator[tuple[int, int, T]]:
        """(low, high, work(low, high)) over rows [start, end) in batches that fit."""
        low = start
        while low < end:
            high = min(low + self.rows, end)
            fitted, result = self._attempt(work, low, high)
            if fitted:
                yield low, high, result
                low = high

    def _attempt(self, work: Callable[[int, int], T], low: int, high: int) -> tuple[bool, T | None]:
        from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

        try:
            return True, work(low, high)
        except RuntimeError as err:
            if not self.halve or self.rows == 1 or not should_reduce_batch_size(err):
                raise
        # Past the except block the error, and the failed batch's tensors its traceback held, are gone.
        clear_device_cache(garbage_collection=True)
        self.rows = max(1, self.rows // 2)
        warnings.warn(
            f"teacher cache: a batch of {high - low} rows ran out of memory; continuing with batch_size={self.rows}.",
            stacklevel=4,
        )
        return False, None


def draws_for_budget(teacher: Any, rows: list[dict[str, Any]], collator: Callable[[list[dict[str, Any]]], Any],
                     spec: dict[str, Any], budget: float, fitting: FittingBatchSize) -> int:
    """The most draws (<= MAX_DRAWS) whose sampled signal of ``rows`` (the first of the dataset, so a
    rerun picks the same number; run in batches that fit) fits ``budget`` bytes per position as stored
    (:func:`signal_bytes`, as the manifest counts them: list offsets included, 24 bytes a row).

    The bytes follow the distinct ids drawn and the gaps between them, which depend on how peaked the
    teacher is, so each candidate is drawn and encoded as the build will, from one teacher forward.
    """
    import torch

    def forward(low: int, high: int) -> LabelledStates:
        return LabelledStates.of(teacher, rows[low:high], collator(rows[low:high]))

    with torch.inference_mode(), _evaluating(teacher):
        parts = list(fitting.batches(0, len(rows), forward))
        positions = sum(sum(states.positions) for _, _, states in parts)
        if not positions:
            raise ValueError(
                f"bytes_per_token: the first {len(rows)} rows, where the draws are measured, have no labelled "
                "position once collated; give k= (the draws) instead."
            )

        def measured_bytes(draws: int) -> float:
            candidate = {**spec, "k": draws, "draws": draws}
            schema = shard_schema(candidate)
            stored = [encode_states(states, rows[low:high], low, candidate, schema) for low, high, states in parts]
            return sum(signal_bytes(record, "sampled") for record in stored) / positions

        low, high = 1, MAX_DRAWS  # bytes grow with the draws: bisect for the last that fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if measured_bytes(middle) <= budget else (low, middle - 1)
        if low == 1 and (one_draw := measured_bytes(1)) > budget:
            raise ValueError(
                f"bytes_per_token={budget}: one draw already takes {one_draw:.2f} bytes per labelled position as "
                "stored here (with the list offsets of rows this short, 24 bytes a row); give at least that, or k=1."
            )
    return low


def default_preparation_args() -> Any:
    """The data settings a default ``DistillationConfig`` prepares and collates rows with, for a build
    given no ``args``: TRL's SFTConfig defaults, with the two defaults DistillationConfig changes (bf16
    and gradient checkpointing, which do not shape rows) set as it sets them on a CPU. Built here from
    ``trl.SFTConfig`` so the cache does not import the trainer stage above it."""
    from trl import SFTConfig

    return SFTConfig(report_to=[], bf16=False, gradient_checkpointing=None)


def prepare_rows(
    dataset: Any, tokenizer: Any, args: Any, formatting_func: Callable[[dict], str] | None = None
) -> tuple[Any, dict[str, Any]]:
    """The rows the trainer trains on with ``args`` and ``formatting_func`` (TRL's SFT preparation, as in
    the trainer), and the record of what they depend on (:func:`hf_capgap.data.sft.prepare_and_record`)."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset must be a map-style datasets.Dataset (text, messages, prompt-completion or input_ids), "
            f"got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError("dataset is empty: there is nothing to cache; check how it was loaded or filtered.")
    prepared, record = prepare_and_record(dataset, tokenizer, args, formatting_func=formatting_func)
    if len(prepared) == 0:
        raise ValueError("no row of the dataset has a token in the loss after preparation; check its masks.")
    return prepared, record


def _real_vocab_size(teacher: Any, tokenizer: Any) -> int:
    """The tokenizer's vocabulary (the online trainer's target), checked against the teacher's logits."""
    if tokenizer is None:
        return int(teacher.config.vocab_size)
    return check_logits_cover(teacher, tokenizer, "the teacher")


def _check_options(
    mode: str, k: int, temperature: float, batch_size: int, shard_tokens: int, dtype: str, sampler: str
) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a cache mode; use one of {', '.join(MODES)}.")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not a sampler; use one of {', '.join(SAMPLERS)}.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int (entries kept, or draws, per position).")
    if mode == "sampled" and k > MAX_DRAWS:
        raise ValueError(f"k={k} draws: a sampled cache stores counts as uint8, so use k <= {MAX_DRAWS}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int.")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens!r} must be a positive int.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a storage dtype; use one of {', '.join(DTYPES)}.")


def _check_rows(rows: Any, real_vocab: int) -> int:
    """Total tokens of the prepared rows; raise if an id is outside the real vocabulary."""
    import pyarrow.compute as pc

    ids = pc.list_flatten(rows.with_format("arrow")[:]["input_ids"])
    low, high = pc.min(ids).as_py(), pc.max(ids).as_py()
    if low < 0:
        raise ValueError("dataset 'input_ids' holds negative ids; token ids must be >= 0.")
    if high >= real_vocab:
        raise ValueError(
            f"dataset holds token id {high} but the real vocabulary has {real_vocab} tokens; the dataset was "
            "tokenized for another model."
        )
    if not has_labelled_position(rows):
        raise ValueError("no row has a labelled token after its first one: there is nothing to cache.")
    return len(ids)


RECORDED_SINCE_FORMAT_4 = ("preparation",)
"""Spec fields a cache of the current format may lack, having been built before they were recorded."""


def _mismatches(have: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    return [
        f"{field}: on disk {have.get(field)!r}, requested {want!r}"
        for field, want in spec.items()
        if have.get(field) != want and not (field in RECORDED_SINCE_FORMAT_4 and field not in have)
    ]


def _record_preparation(path: Path, spec: dict[str, Any]) -> None:
    """Add the data settings to the manifest of a matching cache built before they were recorded: its
    rows have the fingerprint of the rows this build's settings give, so the settings describe them."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    missing = {field: spec[field] for field in RECORDED_SINCE_FORMAT_4 if field not in manifest}
    if missing:
        atomic_write_json(path / MANIFEST_NAME, {**manifest, **missing})


_RECORD_TEMPORARIES = (temporary_prefix(MANIFEST_NAME), temporary_prefix(SPEC_NAME))


def _is_cache_file(name: str) -> bool:
    """Files a build writes, including temporaries an interrupted build may leave behind."""
    return name in (MANIFEST_NAME, SPEC_NAME) or name.startswith(("shard-", ".shard-", *_RECORD_TEMPORARIES))


def _inspect_directory(path: Path, spec: dict[str, Any], *, overwrite: bool) -> str:
    """Say what ``path`` holds: 'complete' (same settings), 'stale' (to replace) or 'build' (new/resume).

    Read-only, so every rank runs it and all raise together; foreign or mismatched contents are refused.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"cache path {path} is a file; pass a directory path.")
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    foreign = [name for name in names if not _is_cache_file(name)]
    if foreign:
        raise ArtifactError(
            f"{path} holds files that are not part of a teacher cache ({foreign[:3]}); choose an empty or new path."
        )
    for name, what in ((MANIFEST_NAME, "a complete cache"), (SPEC_NAME, "an unfinished cache build")):
        if name not in names:
            continue
        have = json.loads((path / name).read_text())
        problems = (
            _mismatches(have, spec) if have.get("kind", KIND) == KIND else ["kind: not a teacher cache"]
        )
        if not problems:
            return "complete" if name == MANIFEST_NAME else "build"
        if not overwrite:
            raise ArtifactError(
                f"{path} holds {what} made with other settings ({'; '.join(problems)}); pass overwrite=True "
                "to replace it, or choose another path."
            )
        return "stale"
    if any(name.startswith("shard-") for name in names):
        if not overwrite:
            raise ArtifactError(
                f"{path} holds cache shards without a manifest or build record, so their settings are unknown; "
                "pass overwrite=True to replace them, or choose another path."
            )
        return "stale"
    return "build"


def _claim_directory(path: Path, *, stale: bool, spec: dict[str, Any]) -> None:
    """Remove a replaced cache, or the half-written records a killed build left, and record this build's spec.

    The manifest goes first (so the folder never looks complete) and the old spec last (so shards are
    never left behind without a record of their settings).
    """
    if stale:
        names = sorted((p.name for p in path.iterdir()), key=lambda n: (n != MANIFEST_NAME, n == SPEC_NAME))
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()
    elif path.is_dir():
        for leftover in (p for p in path.iterdir() if p.name.startswith(_RECORD_TEMPORARIES)):
            leftover.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / SPEC_NAME, spec)


def _build_shards(
    teacher: Any,
    rows: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    path: Path,
    spec: dict[str, Any],
    plan: ShardPlan,
    todo: list[int],
    fitting: FittingBatchSize,
    progress: bool,
) -> None:
    import torch
    from tqdm.auto import tqdm

    schema = shard_schema(spec)

    def encode_rows(low: int, high: int) -> pa.RecordBatch:
        batch_rows = row_dicts(rows.with_format("arrow")[low:high])
        return encode_batch(teacher, batch_rows, collator(batch_rows), low, spec, schema)

    bar = tqdm(
        total=sum(plan.rows(j)[1] - plan.rows(j)[0] for j in todo),
        desc="teacher cache",
        unit="seq",
        disable=not progress,
    )
    try:
        with torch.inference_mode(), _evaluating(teacher):
            for j in todo:
                start, end = plan.rows(j)
                final = path / shard_name(j)
                tmp = path / f".{final.name}.tmp"
                with open(tmp, "wb") as handle, pa.ipc.new_stream(handle, schema) as writer:
                    for low, high, record in fitting.batches(start, end, encode_rows):
                        writer.write_batch(record)
                        bar.update(high - low)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, final)
    finally:
        bar.close()


def _batch_count(plan: ShardPlan, shards: list[int], batch_size: int) -> int:
    return sum(-(-(plan.rows(j)[1] - plan.rows(j)[0]) // batch_size) for j in shards)


def _join_other_ranks_forwards(
    teacher: Any, rows: Any, collator: Callable[[list[dict[str, Any]]], Any], forwards: int
) -> None:
    """Run the teacher ``forwards`` times on the first row: what this rank owes the busier ranks when
    the teacher is sharded (ranks build different shards, but each forward needs every rank)."""
    import torch

    if not forwards:
        return
    first = row_dicts(rows.with_format("arrow")[:1])
    with torch.inference_mode(), _evaluating(teacher):
        for _ in range(forwards):
            LabelledStates.of(teacher, first, collator(first))


@contextlib.contextmanager
def _evaluating(teacher: Any) -> Iterator[None]:
    """The teacher in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = teacher.training
    teacher.eval()
    try:
        yield
    finally:
        teacher.train(was_training)


def _shard_is_complete(final: Path, plan: ShardPlan, index: int) -> bool:
    """A renamed shard is complete by construction; still check its rows and drop any stale temp file."""
    with contextlib.suppress(FileNotFoundError):
        (final.parent / f".{final.name}.tmp").unlink()
    if not final.exists():
        return False
    start, end = plan.rows(index)
    try:
        if arrow_row_count(final) == end - start:
            return True
    except ArtifactError:
        pass
    final.unlink()
    return False


def _signal_summary(file: Path, mode: str) -> tuple[int, int]:
    """(bytes of the teacher signal columns, labelled positions) of one shard."""
    import pyarrow.compute as pc

    with pa.memory_map(str(file)) as source:
        table = pa.ipc.open_stream(source).read_all()
    positions = pc.sum(pc.list_value_length(table.column(POSITION_COLUMN[mode]))).as_py() or 0
    return signal_bytes(table, mode), positions


def _write_final_manifest(path: Path, spec: dict[str, Any], plan: ShardPlan, teacher_name: str) -> None:
    shards = []
    for j in range(plan.num_shards):
        file = path / shard_name(j)
        start, end = plan.rows(j)
        rows = arrow_row_count(file)
        if rows != end - start:
            raise ArtifactError(
                f"{file} holds {rows} rows instead of {end - start}; rerun the build to redo it."
            )
        signal_bytes, positions = _signal_summary(file, spec["mode"])
        shards.append(
            {
                "file": file.name,
                "rows": [start, end],
                "num_rows": rows,
                "num_positions": positions,
                "bytes": file.stat().st_size,
                "sha256": file_sha256(file),
                "signal_bytes": signal_bytes,
            }
        )
    fields = {
        **spec,
        "teacher_name": teacher_name,
        "value_storage": "float16" if spec["dtype"] == "float16" else "bfloat16 bit pattern in uint16",
        "logprob_floor": LOGPROB_FLOOR,
        "num_positions": sum(s["num_positions"] for s in shards),
        "signal_bytes": sum(s["signal_bytes"] for s in shards),
        "shards": shards,
    }
    write_manifest(path, KIND, FORMAT_VERSION, fields, checksum_files=False)
    (path / SPEC_NAME).unlink()
