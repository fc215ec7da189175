"""The law of capacity gap: fit it from a sweep ledger, predict the best teacher for a student size,
suggest one among available teachers, save/load/plot it. Numbers only: importing this package never
loads torch.
"""

from __future__ import annotations

from hf_capgap.law.law import (
    FORMAT_VERSION,
    KIND,
    CONFIDENCE,
    PAPER_RATIO,
    PAPER_FAMILIES,
    CITATION,
    REQUIRED_FIELDS,
    INTERVAL_METHOD,
    MIN_TEACHERS_PER_STUDENT,
    MIN_STUDENTS,
    FEW_STUDENTS,
    MIN_AFFINE_BAND_STUDENTS,
    MIN_BOOTSTRAP,
    TooFewOptimaError,
    CapacityGapWarning,
    parse_params,
    format_params,
    Optimum,
    Prediction,
    TeacherOption,
    Suggestion,
    CapacityGapLaw,
    plot_measurements,
    STUDENT_SIZE_TOLERANCE,
)
from hf_capgap.law.records import read_ledger

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
    "plot_measurements",
    "STUDENT_SIZE_TOLERANCE",
    "read_ledger",
]
