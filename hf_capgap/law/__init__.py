"""The law of capacity gap: fit it from a sweep ledger, predict the best teacher for a student size,
suggest one among available teachers, plan teacher assistants for a teacher too big, save/load/plot it.
Numbers only: importing this package never loads torch.
"""

from __future__ import annotations

from hf_capgap.law.chain import MAX_STEPS, ChainPlan
from hf_capgap.law.fit import (
    CONFIDENCE,
    FEW_STUDENTS,
    INTERVAL_METHOD,
    MIN_AFFINE_BAND_STUDENTS,
    MIN_BOOTSTRAP,
    MIN_STUDENTS,
    MIN_TEACHERS_PER_STUDENT,
    CapacityGapWarning,
    Optimum,
    TooFewOptimaError,
)
from hf_capgap.law.law import CapacityGapLaw, Prediction, Suggestion, TeacherOption
from hf_capgap.law.paper import CITATION, PAPER_FAMILIES, PAPER_RATIO
from hf_capgap.law.params import format_params, parse_params
from hf_capgap.law.plot import plot_measurements
from hf_capgap.law.records import REQUIRED_FIELDS, STUDENT_SIZE_TOLERANCE, read_ledger
from hf_capgap.law.storage import FORMAT_VERSION, KIND

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "CONFIDENCE",
    "PAPER_RATIO",
    "PAPER_FAMILIES",
    "CITATION",
    "REQUIRED_FIELDS",
    "INTERVAL_METHOD",
    "MIN_TEACHERS_PER_STUDENT",
    "MIN_STUDENTS",
    "FEW_STUDENTS",
    "MIN_AFFINE_BAND_STUDENTS",
    "MIN_BOOTSTRAP",
    "TooFewOptimaError",
    "CapacityGapWarning",
    "parse_params",
    "format_params",
    "Optimum",
    "Prediction",
    "TeacherOption",
    "Suggestion",
    "CapacityGapLaw",
    "ChainPlan",
    "MAX_STEPS",
    "plot_measurements",
    "STUDENT_SIZE_TOLERANCE",
    "read_ledger",
]
