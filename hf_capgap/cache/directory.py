"""The folder a cache build writes: what it already holds (complete, stale, or a build to resume), the
build's own record of its settings, finished shards, and the manifest written last."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from hf_capgap.cache.format import (
    FORMAT_VERSION,
    KIND,
    LOGPROB_FLOOR,
    POSITION_COLUMN,
    ShardPlan,
    arrow_row_count,
    shard_name,
    signal_bytes,
)
from hf_capgap.errors import ConfigError
from hf_capgap.utils.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    atomic_write_json,
    file_sha256,
    temporary_prefix,
    write_manifest,
)

SPEC_NAME = ".build_spec.json"
"""Settings of an unfinished build, so a rerun with other inputs cannot mix its shards in."""
RECORDED_SINCE_FORMAT_4 = ("preparation",)
"""Spec fields a cache of the current format may lack, having been built before they were recorded."""
_RECORD_TEMPORARIES = (temporary_prefix(MANIFEST_NAME), temporary_prefix(SPEC_NAME))


def inspect_directory(path: Path, spec: dict[str, Any], *, overwrite: bool) -> str:
    """Say what ``path`` holds: 'complete' (same settings), 'stale' (to replace) or 'build' (new/resume).

    Read-only, so every rank runs it and all raise together; foreign or mismatched contents are refused.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"cache path {path} is a file; pass a directory path.")
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
        problems = _mismatches(have, spec) if have.get("kind", KIND) == KIND else ["kind: not a teacher cache"]
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


def _is_cache_file(name: str) -> bool:
    """Files a build writes, including temporaries an interrupted build may leave behind."""
    return name in (MANIFEST_NAME, SPEC_NAME) or name.startswith(("shard-", ".shard-", *_RECORD_TEMPORARIES))


def _mismatches(have: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    return [
        f"{field}: on disk {have.get(field)!r}, requested {want!r}"
        for field, want in spec.items()
        if have.get(field) != want and not (field in RECORDED_SINCE_FORMAT_4 and field not in have)
    ]


def record_preparation(path: Path, spec: dict[str, Any]) -> None:
    """Add the data settings to the manifest of a matching cache built before they were recorded: its
    rows have the fingerprint of the rows this build's settings give, so the settings describe them."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    missing = {field: spec[field] for field in RECORDED_SINCE_FORMAT_4 if field not in manifest}
    if missing:
        atomic_write_json(path / MANIFEST_NAME, {**manifest, **missing})


def claim_directory(path: Path, *, stale: bool, spec: dict[str, Any]) -> None:
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


def shard_is_complete(final: Path, plan: ShardPlan, index: int) -> bool:
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


def write_final_manifest(path: Path, spec: dict[str, Any], plan: ShardPlan, teacher_name: str) -> None:
    """The manifest over every shard (rows, positions, bytes, checksum), then the build record removed."""
    shards = []
    for j in range(plan.num_shards):
        file = path / shard_name(j)
        start, end = plan.rows(j)
        rows = arrow_row_count(file)
        if rows != end - start:
            raise ArtifactError(f"{file} holds {rows} rows instead of {end - start}; rerun the build to redo it.")
        shard_signal_bytes, positions = _signal_summary(file, spec["mode"])
        shards.append(
            {
                "file": file.name,
                "rows": [start, end],
                "num_rows": rows,
                "num_positions": positions,
                "bytes": file.stat().st_size,
                "sha256": file_sha256(file),
                "signal_bytes": shard_signal_bytes,
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


def _signal_summary(file: Path, mode: str) -> tuple[int, int]:
    """(bytes of the teacher signal columns, labelled positions) of one shard."""
    import pyarrow.compute as pc

    with pa.memory_map(str(file)) as source:
        table = pa.ipc.open_stream(source).read_all()
    positions = pc.sum(pc.list_value_length(table.column(POSITION_COLUMN[mode]))).as_py() or 0
    return signal_bytes(table, mode), positions
