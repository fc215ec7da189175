"""The sweep's output folder: its file names, the ledger of finished runs (read through the law's one
ledger reader, written whole and atomically per record) and the progress of the planned runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_capgap.law import format_params, read_ledger
from hf_capgap.sweep.config import SweepConfig, plan, taid_run_suffix
from hf_capgap.utils.artifacts import ArtifactError, atomic_write_bytes, json_sha256

LEDGER_FILE = "ledger.jsonl"
RUNNING_FILE = "running.json"
LAW_FILE = "law.json"
LAW_PLOT_FILE = "law.png"
LAW_FAILURE_FILE = "law_failure.json"
LOCK_FILE = ".sweep.lock"
SCRATCH_PREFIX = ".run-"
LEDGER_FORMAT_VERSION = 1
RECORD_FIELDS = ("run_id", "format_version", "student_params", "teacher_params", "eval_loss", "settings_sha256")
"""What every ledger line holds; a line without them is not a finished run."""


def finished_records(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The finished runs of a sweep folder (none before its first run); a torn last line is dropped with a
    warning, any other damaged line or a run recorded twice raises ArtifactError."""
    path = Path(output_dir) / LEDGER_FILE
    if not path.is_file():
        return []
    records = [_current_run_id(record) for record in read_ledger(path, required_fields=RECORD_FIELDS)]
    run_ids = [record["run_id"] for record in records]
    duplicated = sorted({run_id for run_id in run_ids if run_ids.count(run_id) > 1})
    if duplicated:
        raise ArtifactError(f"{path} holds runs {duplicated} more than once; keep one line per run.")
    return records


def _current_run_id(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with today's run id: a TAID cell recorded before its ids ended in ``-taid`` gets the suffix (the
    next write of the ledger stores it), so a resumed TAID sweep finds its finished cells instead of redoing them."""
    settings = record.get("settings")
    if not isinstance(settings, Mapping) or settings.get("loss") != "taid" or "-taid" in record["run_id"]:
        return record
    return {**record, "run_id": record["run_id"] + taid_run_suffix(settings)}


def append_record(output_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Add one record by rewriting the whole ledger atomically (temp file + rename)."""
    write_ledger(output_dir, [*finished_records(output_dir), dict(record)])


def write_ledger(output_dir: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Replace the ledger with ``records``, atomically: a kill leaves the old ledger or the new one."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in records)
    atomic_write_bytes(Path(output_dir) / LEDGER_FILE, text.encode())


def is_failed(record: Mapping[str, Any]) -> bool:
    """A run whose student diverged: its eval_loss is NaN or infinite."""
    loss = record["eval_loss"]
    return not (isinstance(loss, (int, float)) and math.isfinite(loss))


def sweep_status(config: SweepConfig) -> list[dict[str, Any]]:
    """Each planned run with its state: ``done`` (in the ledger, made with ``config``'s settings), ``foreign`` (in
    the ledger with other settings: another sweep's cell, which :func:`~hf_capgap.sweep.run_sweep` refuses),
    ``running`` (a live process) or ``left``."""
    settings_sha = json_sha256(config.settings())
    done = {record["run_id"]: record for record in finished_records(config.output_dir)}
    running = _live_running_run(Path(config.output_dir))
    rows = []
    for spec in plan(config):
        record = done.get(spec.run_id)
        if record and record["settings_sha256"] != settings_sha:
            state, record = "foreign", None
        else:
            state = "done" if record else "running" if spec.run_id == running else "left"
        rows.append({**dataclasses.asdict(spec), "state": state, "eval_loss": record and record["eval_loss"]})
    return rows


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    """A terminal table of :func:`sweep_status` rows and a one-line count."""
    lines = [f"{'run':<44}{'student':>9}{'teacher':>10}  {'state':<8}{'eval loss':>10}"]
    for row in rows:
        loss = "" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        lines.append(
            f"{row['run_id']:<44}{format_params(row['student_params']):>9}"
            f"{format_params(row['teacher_params']):>10}  {row['state']:<8}{loss:>10}"
        )
    counts = {state: sum(row["state"] == state for row in rows) for state in ("done", "running", "left")}
    lines.append(", ".join(f"{count} {state}" for state, count in counts.items()))
    foreign = sum(row["state"] == "foreign" for row in rows)
    if foreign:
        lines[-1] += f", {foreign} foreign (made with other settings: this output_dir is another sweep's)"
    return "\n".join(lines)


def diverged_note(records: Sequence[Mapping[str, Any]]) -> str | None:
    """What to tell the user about runs whose student diverged, or None when none did."""
    failed = [record["run_id"] for record in records if is_failed(record)]
    if not failed:
        return None
    return (
        f"{len(failed)} run(s) diverged (eval_loss not finite): {', '.join(failed)}; "
        "run again with --redo_failed true to redo them."
    )


def _live_running_run(output_dir: Path) -> str | None:
    try:
        running = json.loads((output_dir / RUNNING_FILE).read_text())
        os.kill(int(running["pid"]), 0)
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError, ProcessLookupError, PermissionError):
        return None
    return running["run_id"]
