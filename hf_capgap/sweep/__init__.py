"""Measure the law: distill a grid of students from a ladder of teachers, append every result to a
ledger that survives a crash, and fit the law from it.

config.py says what a sweep measures (SweepConfig, the grid), ledger.py keeps its output folder (the
ledger of finished runs, progress), teachers.py loads the teachers and data, cell.py runs one cell (prune,
distil, evaluate), assistants.py builds the teacher assistants of chained cells, run.py runs the grid.
"""

from __future__ import annotations

from hf_capgap.sweep.cell import evaluate_student
from hf_capgap.sweep.config import (
    HUB_FAMILIES,
    HUB_MODEL_TYPES,
    TEACHER_SIGNALS,
    RunSpec,
    SweepConfig,
    family_names,
    family_teachers,
    plan,
)
from hf_capgap.sweep.ledger import (
    LAW_FAILURE_FILE,
    LAW_FILE,
    LAW_PLOT_FILE,
    LEDGER_FILE,
    LEDGER_FORMAT_VERSION,
    LOCK_FILE,
    RECORD_FIELDS,
    RUNNING_FILE,
    SCRATCH_PREFIX,
    append_record,
    diverged_note,
    finished_records,
    format_status,
    is_failed,
    sweep_status,
)
from hf_capgap.sweep.run import fit_and_save_law, run_cell, run_sweep, sweep_report
from hf_capgap.sweep.teachers import check_hub_access

__all__ = [
    "LEDGER_FILE",
    "RUNNING_FILE",
    "LAW_FILE",
    "LAW_PLOT_FILE",
    "LAW_FAILURE_FILE",
    "LOCK_FILE",
    "SCRATCH_PREFIX",
    "LEDGER_FORMAT_VERSION",
    "RECORD_FIELDS",
    "TEACHER_SIGNALS",
    "HUB_FAMILIES",
    "HUB_MODEL_TYPES",
    "SweepConfig",
    "RunSpec",
    "family_names",
    "family_teachers",
    "plan",
    "finished_records",
    "append_record",
    "is_failed",
    "diverged_note",
    "sweep_status",
    "format_status",
    "sweep_report",
    "check_hub_access",
    "run_sweep",
    "run_cell",
    "fit_and_save_law",
    "evaluate_student",
]
