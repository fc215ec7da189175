"""Fitting the law of capacity gap: the optimum of each student size, the line through them, its interval.

For each student size s, students pruned from and distilled by teachers of several sizes t are
evaluated on held-out data; the best teacher t*(s) is where that held-out loss is lowest. The law
says t* grows linearly with s; Zhang et al. (2023) found t* ~ 2.5 s on GPT-2 and Pythia.

How the fit works and why:

* t*(s) is the vertex of a quadratic in log t through the best measured teacher and its two
  neighbours, clipped to that bracket. A sweep grid is log-spaced and coarse, so its argmin alone
  quantises t* to the grid; the vertex interpolates between grid points.
* t* = k s is fitted in log space, log k = mean(log t* - log s), i.e. k is the geometric mean of
  the ratios t*/s. Ratios are scale-free and the vertex error is multiplicative, so a 70M and a 3B
  student weigh the same; plain least squares on t* would be decided by the largest student.
* t* = k s + b is fitted by least squares on relative residuals (t* - k s - b) / t*, for the same
  reason. Both R^2 are measured on log t*, so they are comparable.
* The interval is a case bootstrap over student sizes: each draw resamples the interior optima with
  replacement and refits. Its percentiles are widened for small samples (the expanded percentile
  interval), since a sweep has only a handful of student sizes. It captures how much the optima
  scatter around the line; with fewer than five student sizes it still comes out too narrow (a
  warning says so).
* For t* = k s every draw counts, even one that repeats a single size: k is a mean of per-student
  ratios, and such draws are what carries the spread of those ratios. With two sizes the widened
  percentiles reach the extreme draws, so the interval of k runs from the smaller observed ratio
  t*/s to the larger one. For t* = k s + b a draw must hold two distinct sizes to fix a line, so only
  those draws are redrawn; with two sizes every line passes through both optima and there is no
  spread left to measure, so an affine law from two sizes carries no band (a warning says so).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_capgap.errors import ConfigError, HfCapgapError
from hf_capgap.law.params import format_params
from hf_capgap.law.records import curves, read_records, validated_records

CONFIDENCE = 0.95
INTERVAL_METHOD = 2
"""Recorded as ``bootstrap.method`` in a saved law. Files without it come from method 1, which
redrew every single-size draw and so gave two student sizes a zero-width interval; loading one
recomputes its interval from the stored records (the bootstrap is seeded, hence deterministic)."""
MIN_TEACHERS_PER_STUDENT = 3
MIN_STUDENTS = 2
FEW_STUDENTS = 5
MIN_AFFINE_BAND_STUDENTS = 3
MIN_BOOTSTRAP = 100


class TooFewOptimaError(HfCapgapError, ValueError):
    """The records bracket too few students' optima to fit a line (the grid needs more teachers)."""


class CapacityGapWarning(UserWarning):
    """A fit went ahead but part of the sweep was left out or is too small to trust fully."""


@dataclass(frozen=True)
class Optimum:
    """Where one student size's held-out loss is lowest along the teacher sizes."""

    student_params: float
    teacher_params: float
    loss: float
    points_used: tuple[float, ...]
    interior: bool
    note: str | None = None


def locate_optima(rows: Iterable[Mapping[str, Any]]) -> list[Optimum]:
    """Each student size's optimum (or why it has none), smallest student first."""
    return [_locate_optimum(student, curve) for student, curve in sorted(curves(list(rows)).items())]


def fit_fields(records: Any, *, n_bootstrap: int, seed: int, through_origin: bool) -> dict[str, Any]:
    """The fitted law's constructor arguments, but ``source``: see ``CapacityGapLaw.fit``."""
    if not isinstance(n_bootstrap, (int, np.integer)) or isinstance(n_bootstrap, bool) or n_bootstrap < MIN_BOOTSTRAP:
        raise ConfigError(
            f"n_bootstrap must be an integer of at least {MIN_BOOTSTRAP} for a "
            f"{CONFIDENCE:.0%} interval, got {n_bootstrap!r}."
        )
    rows = validated_records(read_records(records))
    optima = locate_optima(rows)
    interior = [optimum for optimum in optima if optimum.interior]
    _check_enough_students(optima, interior)
    if len(interior) < FEW_STUDENTS:
        warnings.warn(
            f"only {len(interior)} student sizes have an interior optimum; the bootstrap interval "
            f"over student sizes is coarse and too narrow with fewer than {FEW_STUDENTS}. "
            "Add student sizes.",
            CapacityGapWarning,
            stacklevel=3,
        )
    students = np.array([optimum.student_params for optimum in interior])
    teachers = np.array([optimum.teacher_params for optimum in interior])
    ratio = fit_ratio(students, teachers)
    slope, intercept = fit_affine(students, teachers)
    if not through_origin and slope <= 0:
        raise ConfigError(
            f"the affine fit t* = k s + b has a non-positive slope ({slope:.3g}); the optima do not "
            "grow with student size. Use through_origin=True or add student sizes."
        )
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(interior), size=(n_bootstrap, len(interior)))
    ratio_draws = np.array([fit_ratio(students[sample], teachers[sample]) for sample in samples])
    percentiles = _expanded_percentiles(len(interior))
    ratio_ci = tuple(np.percentile(ratio_draws, percentiles))
    if through_origin:
        band_draws = np.column_stack([ratio_draws, np.zeros_like(ratio_draws)])
    elif len(interior) < MIN_AFFINE_BAND_STUDENTS:
        warnings.warn(
            f"an affine line through {len(interior)} student sizes fits them exactly, so it carries no "
            f"interval; add student sizes (at least {MIN_AFFINE_BAND_STUDENTS}) for one, or use the "
            "through-origin law, whose interval reflects the spread of the ratios.",
            CapacityGapWarning,
            stacklevel=3,
        )
        band_draws = None
    else:
        spanning = _spanning_two_sizes(samples, rng)
        band_draws = np.array([fit_affine(students[sample], teachers[sample]) for sample in spanning])
    return dict(
        ratio=ratio,
        ratio_ci=ratio_ci,
        through_origin=through_origin,
        slope_affine=slope,
        intercept=intercept,
        r2=r2_log(teachers, ratio * students),
        r2_affine=r2_log(teachers, slope * students + intercept),
        optima=optima,
        records=rows,
        families=sorted({row["family"] for row in rows if "family" in row}),
        band_draws=band_draws,
        band_percentiles=percentiles,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


def _locate_optimum(student: float, curve: tuple[np.ndarray, np.ndarray]) -> Optimum:
    """The vertex of a quadratic in log t through the best teacher and its neighbours, or why not."""
    teachers, losses = curve
    best = int(np.argmin(losses))
    note = _unbracketed(student, teachers, best)
    if note is not None:
        return Optimum(student, float(teachers[best]), float(losses[best]), tuple(map(float, teachers)), False, note)
    x = np.log(teachers[best - 1 : best + 2])
    curvature, slope, constant = np.polyfit(x, losses[best - 1 : best + 2], 2)
    vertex = float(np.clip(-slope / (2 * curvature), x[0], x[-1])) if curvature > 0 else float(x[1])
    return Optimum(
        student_params=student,
        teacher_params=float(np.exp(vertex)),
        loss=float(np.polyval([curvature, slope, constant], vertex)),
        points_used=tuple(float(t) for t in teachers[best - 1 : best + 2]),
        interior=True,
    )


def _unbracketed(student: float, teachers: np.ndarray, best: int) -> str | None:
    """Why the measured teachers do not bracket this student's optimum, or ``None`` if they do."""
    name, best_name = format_params(student), format_params(teachers[best])
    if len(teachers) < MIN_TEACHERS_PER_STUDENT:
        return (
            f"student {name} has {len(teachers)} teacher size(s); bracketing a minimum needs at least "
            f"{MIN_TEACHERS_PER_STUDENT}. Add teacher sizes around {best_name}."
        )
    if best == 0:
        return (
            f"student {name}: best teacher {best_name} is the smallest tried; add teachers between "
            f"{name} and {best_name} to bracket the optimum."
        )
    if best == len(teachers) - 1:
        return f"student {name}: best teacher {best_name} is the largest tried; add teachers larger than it."
    return None


def _check_enough_students(optima: list[Optimum], interior: list[Optimum]) -> None:
    excluded = [optimum.note for optimum in optima if not optimum.interior]
    if len(interior) < MIN_STUDENTS:
        detail = " ".join(excluded) if excluded else "the records cover only one student size."
        raise TooFewOptimaError(
            f"{len(interior)} student size(s) have an interior optimum; fitting the law needs at least "
            f"{MIN_STUDENTS}. {detail}"
        )
    for note in excluded:
        warnings.warn(f"excluded from the fit: {note}", CapacityGapWarning, stacklevel=4)


def fit_ratio(students: np.ndarray, teachers: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(teachers / students))))


def fit_affine(students: np.ndarray, teachers: np.ndarray) -> tuple[float, float]:
    """Least squares on relative residuals: rows divided by t* so every student weighs the same."""
    design = np.column_stack([students / teachers, 1 / teachers])
    (slope, intercept), *_ = np.linalg.lstsq(design, np.ones_like(teachers), rcond=None)
    return float(slope), float(intercept)


def r2_log(teachers: np.ndarray, predicted: np.ndarray) -> float:
    observed = np.log(teachers)
    residual = observed - np.log(np.maximum(predicted, np.finfo(float).tiny))
    total = np.sum((observed - observed.mean()) ** 2)
    if total == 0:
        return 1.0 if np.allclose(residual, 0) else 0.0
    return float(1 - np.sum(residual**2) / total)


def _spanning_two_sizes(samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The bootstrap rows, with each row that picks a single size drawn again until it holds two.

    A single size cannot fix a line with an intercept; the through-origin ratio keeps those rows.
    """
    spanning = samples.copy()
    for row in range(len(spanning)):
        while np.unique(spanning[row]).size < 2:
            spanning[row] = rng.integers(0, samples.shape[1], size=samples.shape[1])
    return spanning


def _expanded_percentiles(n_students: int) -> tuple[float, float]:
    """Percentiles of the bootstrap draws that bound a CONFIDENCE interval from ``n_students`` points.

    The plain percentile interval of a mean over n points is too narrow for small n: the bootstrap
    spread is sqrt((n - 1) / n) of the sampling spread and the tails are normal rather than Student t.
    The expanded percentile interval (Hesterberg, 2015) widens the percentiles to compensate.
    """
    from scipy.special import ndtr, stdtrit

    tail = (1 - CONFIDENCE) / 2
    z = math.sqrt(n_students / (n_students - 1)) * float(stdtrit(n_students - 1, 1 - tail))
    expanded = 100 * float(ndtr(-z))
    return expanded, 100 - expanded
