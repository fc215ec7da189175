"""The law of capacity gap: fit it from a sweep, query it, save it, plot it.

For each student size s, students pruned from and distilled by teachers of several sizes t are
evaluated on held-out data; the best teacher t*(s) is where that held-out loss is lowest. The law
says t* grows linearly with s; Zhang et al. (2023) found t* ~ 2.5 s on GPT-2 and Pythia.

This module is numbers only (numpy, matplotlib imported lazily for plots): a user fits or queries
the law on a laptop without the training stack.

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

import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_capgap.errors import HfCapgapError
from hf_capgap.law.records import read_ledger
from hf_capgap.utils.artifacts import ArtifactError, atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
KIND = "capacity_gap_law"
CONFIDENCE = 0.95
PAPER_RATIO = 2.5
PAPER_FAMILIES = ("GPT-2", "Pythia")
CITATION = (
    '"Towards the Law of Capacity Gap in Distilling Language Models" (Zhang et al., 2023, arXiv:2311.07052)'
)
REQUIRED_FIELDS = ("student_params", "teacher_params", "eval_loss")
INTERVAL_METHOD = 2
"""Recorded as ``bootstrap.method`` in a saved law. Files without it come from method 1, which
redrew every single-size draw and so gave two student sizes a zero-width interval; loading one
recomputes its interval from the stored records (the bootstrap is seeded, hence deterministic)."""
MIN_TEACHERS_PER_STUDENT = 3
MIN_STUDENTS = 2
FEW_STUDENTS = 5
MIN_AFFINE_BAND_STUDENTS = 3
MIN_BOOTSTRAP = 100

_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_PARAMS_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


class TooFewOptimaError(HfCapgapError, ValueError):
    """The records bracket too few students' optima to fit a line (the grid needs more teachers)."""


class CapacityGapWarning(UserWarning):
    """A fit went ahead but part of the sweep was left out or is too small to trust fully."""


def parse_params(text: str | float) -> float:
    """Read a parameter count written as ``3e9``, ``3B``, ``350M``, ``70m`` or a plain number."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _PARAMS_PATTERN.match(str(text))
        if match is None:
            raise ValueError(
                f"cannot read {text!r} as a parameter count; write it like 3e9, 3B, 350M or 70m."
            )
        value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a parameter count must be a positive number, got {text!r}.")
    return value


def format_params(params: float) -> str:
    """Write a parameter count the way model names do: 70M, 1.4B, 6.9B."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return f"{params:.3g}"


@dataclass(frozen=True)
class Optimum:
    """Where one student size's held-out loss is lowest along the teacher sizes."""

    student_params: float
    teacher_params: float
    loss: float
    points_used: tuple[float, ...]
    interior: bool
    note: str | None = None


@dataclass(frozen=True)
class Prediction:
    """A parameter count from the law, with its interval (``None`` where the law carries none)."""

    params: float | np.ndarray
    lo: float | np.ndarray | None
    hi: float | np.ndarray | None


@dataclass(frozen=True)
class TeacherOption:
    """One available teacher judged against the law's optimum for a student."""

    teacher_params: float
    ratio: float
    log_distance: float
    in_interval: bool | None


@dataclass(frozen=True)
class Suggestion:
    """The available teacher closest to the optimum in log space, the others, and why."""

    student_params: float
    teacher_params: float
    optimum: Prediction
    choice: TeacherOption
    alternatives: tuple[TeacherOption, ...]
    excluded: tuple[float, ...]
    reason: str


class CapacityGapLaw:
    """t*(s): the teacher size that distils the best student of size s.

    Build it with :meth:`fit` (from a sweep) or :meth:`paper` (the published law as a prior);
    query it with :meth:`predict`, :meth:`suggest` and :meth:`student_for`.
    """

    def __init__(
        self,
        *,
        ratio: float,
        ratio_ci: tuple[float, float] | None,
        source: str,
        through_origin: bool = True,
        slope_affine: float | None = None,
        intercept: float | None = None,
        r2: float | None = None,
        r2_affine: float | None = None,
        optima: Sequence[Optimum] = (),
        records: Sequence[Mapping[str, Any]] = (),
        families: Sequence[str] = (),
        band_draws: np.ndarray | None = None,
        band_percentiles: tuple[float, float] | None = None,
        n_bootstrap: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not through_origin and (slope_affine is None or intercept is None):
            raise ValueError("an affine law (through_origin=False) needs slope_affine and intercept.")
        self.ratio = float(ratio)
        self.ratio_ci = None if ratio_ci is None else (float(ratio_ci[0]), float(ratio_ci[1]))
        self.source = source
        self.through_origin = through_origin
        self.slope_affine = slope_affine
        self.intercept = intercept
        self.r2 = r2
        self.r2_affine = r2_affine
        self.optima = tuple(optima)
        self.records = [dict(record) for record in records]
        self.families = tuple(families)
        self.band_draws = band_draws
        self.band_percentiles = band_percentiles
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.citation = CITATION

    # ------------------------------------------------------------------ construction

    @classmethod
    def paper(cls) -> CapacityGapLaw:
        """The published law t* = 2.5 s, for users who cannot run a sweep.

        The paper reports a point estimate, not an interval, so ``ratio_ci`` is ``None`` and
        predictions carry no interval: fit your own sweep to learn how far your setup deviates.
        """
        return cls(ratio=PAPER_RATIO, ratio_ci=None, source="paper", families=PAPER_FAMILIES)

    @classmethod
    def fit(
        cls,
        records: str | os.PathLike | Iterable[Mapping[str, Any]] | Any,
        *,
        n_bootstrap: int = 1000,
        seed: int = 0,
        through_origin: bool = True,
    ) -> CapacityGapLaw:
        """Fit the law from sweep records (a JSON-lines ledger path, a list of dicts or a DataFrame).

        Each record needs ``student_params``, ``teacher_params`` and ``eval_loss``; an optional
        ``family`` is kept for the model card. ``through_origin`` picks the line that predictions
        use: t* = k s (the paper's law) or t* = k s + b. Both are always fitted and reported.
        ``ratio_ci`` (the interval of a through-origin law) and the affine band come from the case
        bootstrap the module docstring describes: with two student sizes ``ratio_ci`` spans their two
        ratios t*/s, and an affine law carries no band.
        """
        if (
            not isinstance(n_bootstrap, (int, np.integer))
            or isinstance(n_bootstrap, bool)
            or n_bootstrap < MIN_BOOTSTRAP
        ):
            raise ValueError(
                f"n_bootstrap must be an integer of at least {MIN_BOOTSTRAP} for a "
                f"{CONFIDENCE:.0%} interval, got {n_bootstrap!r}."
            )
        rows = _validated_records(_read_records(records))
        optima = [_locate_optimum(student, curve) for student, curve in sorted(_curves(rows).items())]
        interior = [optimum for optimum in optima if optimum.interior]
        _check_enough_students(optima, interior)
        if len(interior) < FEW_STUDENTS:
            warnings.warn(
                f"only {len(interior)} student sizes have an interior optimum; the bootstrap interval "
                f"over student sizes is coarse and too narrow with fewer than {FEW_STUDENTS}. "
                "Add student sizes.",
                CapacityGapWarning,
                stacklevel=2,
            )
        students = np.array([optimum.student_params for optimum in interior])
        teachers = np.array([optimum.teacher_params for optimum in interior])
        ratio = _fit_ratio(students, teachers)
        slope, intercept = _fit_affine(students, teachers)
        if not through_origin and slope <= 0:
            raise ValueError(
                f"the affine fit t* = k s + b has a non-positive slope ({slope:.3g}); the optima do not "
                "grow with student size. Use through_origin=True or add student sizes."
            )
        rng = np.random.default_rng(seed)
        samples = rng.integers(0, len(interior), size=(n_bootstrap, len(interior)))
        ratio_draws = np.array([_fit_ratio(students[sample], teachers[sample]) for sample in samples])
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
                stacklevel=2,
            )
            band_draws = None
        else:
            spanning = _spanning_two_sizes(samples, rng)
            band_draws = np.array([_fit_affine(students[sample], teachers[sample]) for sample in spanning])
        return cls(
            ratio=ratio,
            ratio_ci=ratio_ci,
            source="fitted",
            through_origin=through_origin,
            slope_affine=slope,
            intercept=intercept,
            r2=_r2_log(teachers, ratio * students),
            r2_affine=_r2_log(teachers, slope * students + intercept),
            optima=optima,
            records=rows,
            families=sorted({row["family"] for row in rows if "family" in row}),
            band_draws=band_draws,
            band_percentiles=percentiles,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )

    # ------------------------------------------------------------------ queries

    def predict(self, student_params: float | Sequence[float] | np.ndarray) -> Prediction:
        """The optimal teacher size for ``student_params`` (scalar or array), with its interval.

        The interval of a through-origin law is ``ratio_ci`` times the student size; an affine law's
        comes from its bootstrap draws of (slope, intercept).
        """
        students = _positive_array(student_params, "student_params")
        slope, intercept = self._line()
        teachers = slope * students + intercept
        if np.any(teachers <= students):
            raise ValueError(
                f"the law predicts no teacher larger than student sizes "
                f"{[format_params(s) for s in students[teachers <= students]]}: they lie outside the "
                "range where the affine fit is meaningful; use a through-origin law for them."
            )
        lo = hi = None
        if self.through_origin and self.ratio_ci is not None:
            lo, hi = self.ratio_ci[0] * students, self.ratio_ci[1] * students
        elif not self.through_origin and self.band_draws is not None:
            band = self.band_draws[:, :1] * students.reshape(1, -1) + self.band_draws[:, 1:]
            lo, hi = self._band(band)
        return _prediction(teachers, lo, hi, np.shape(student_params))

    def student_for(self, teacher_params: float | Sequence[float] | np.ndarray) -> Prediction:
        """The student size that ``teacher_params`` serves best: the law read backwards."""
        teachers = _positive_array(teacher_params, "teacher_params")
        slope, intercept = self._line()
        students = (teachers - intercept) / slope
        if np.any(students <= 0):
            raise ValueError(
                f"teachers {[format_params(t) for t in teachers[students <= 0]]} are below the affine "
                f"law's intercept ({format_params(intercept)}): no student size fits them."
            )
        lo = hi = None
        if self.through_origin and self.ratio_ci is not None:
            lo, hi = teachers / self.ratio_ci[1], teachers / self.ratio_ci[0]
        elif not self.through_origin and self.band_draws is not None:
            usable = self.band_draws[self.band_draws[:, 0] > 0]
            band = (teachers.reshape(1, -1) - usable[:, 1:]) / usable[:, :1]
            lo, hi = self._band(band)
        return _prediction(students, lo, hi, np.shape(teacher_params))

    def suggest(self, student_params: float, available_teachers: Iterable[float]) -> Suggestion:
        """Pick the available teacher closest to the law's optimum (in log size) for a student."""
        student = parse_params(student_params)
        offered = sorted({parse_params(teacher) for teacher in available_teachers})
        if not offered:
            raise ValueError("available_teachers is empty; pass the teacher sizes you can use.")
        usable = [teacher for teacher in offered if teacher > student]
        excluded = tuple(teacher for teacher in offered if teacher <= student)
        if not usable:
            raise ValueError(
                f"no available teacher is larger than the {format_params(student)} student "
                f"(offered: {', '.join(format_params(t) for t in offered)}); the student is pruned "
                "from its teacher, so offer at least one larger model."
            )
        optimum = self.predict(student)
        options = sorted(
            (self._option(student, teacher, optimum) for teacher in usable),
            key=lambda option: abs(option.log_distance),
        )
        choice, alternatives = options[0], tuple(options[1:])
        return Suggestion(
            student_params=student,
            teacher_params=choice.teacher_params,
            optimum=optimum,
            choice=choice,
            alternatives=alternatives,
            excluded=excluded,
            reason=self._reason(student, optimum, choice, alternatives, excluded),
        )

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the law (and to describe it on a model card), JSON-able."""
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "ratio": self.ratio,
            "ratio_ci": None if self.ratio_ci is None else list(self.ratio_ci),
            "confidence": CONFIDENCE if self.ratio_ci is not None else None,
            "through_origin": self.through_origin,
            "slope_affine": self.slope_affine,
            "intercept": self.intercept,
            "r2": self.r2,
            "r2_affine": self.r2_affine,
            "source": self.source,
            "families": list(self.families),
            "citation": self.citation,
            "n_students": sum(optimum.interior for optimum in self.optima),
            "optima": [
                {**asdict(optimum), "points_used": list(optimum.points_used)} for optimum in self.optima
            ],
            "bootstrap": None
            if self.band_draws is None
            else {
                "resampled": "student sizes (cases)",
                "interval": "expanded percentile",
                "method": INTERVAL_METHOD,
                "percentiles": list(self.band_percentiles),
                "n": self.n_bootstrap,
                "seed": self.seed,
                "draws": self.band_draws.tolist(),
            },
            "records": self.records,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapacityGapLaw:
        """Rebuild a law from :meth:`to_dict`; refuses another kind or format version by name.

        A law saved before ``bootstrap.method`` was recorded gets its interval recomputed from its
        stored records (see :data:`INTERVAL_METHOD`), with a warning.
        """
        return cls._from_dict(data, "the law")

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], where: str) -> CapacityGapLaw:
        if not isinstance(data, Mapping):
            raise ArtifactError(f"a law is a JSON object, not a {type(data).__name__}; refit the law.")
        if data.get("kind") != KIND:
            raise ArtifactError(f"this is a {data.get('kind')!r}, not a {KIND!r}.")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"law format_version is {data.get('format_version')!r}, this hf_capgap reads "
                f"{FORMAT_VERSION}; refit it with `hf-capgap law fit` from its ledger."
            )
        try:
            law = cls._from_fields(data)
        except KeyError as err:
            raise ArtifactError(f"the law lacks the field {err}; refit it with `hf-capgap law fit`.") from err
        bootstrap = data["bootstrap"]
        if isinstance(bootstrap, Mapping) and bootstrap.get("method") != INTERVAL_METHOD:
            law._recompute_interval(bootstrap, where)
        return law

    def _recompute_interval(self, bootstrap: Mapping[str, Any], where: str) -> None:
        """Replace an interval saved by an earlier method with this one's, refitted from the stored records.

        The fit is seeded with the stored ``seed`` and ``n``, so loading gives the same interval each
        time; without records (or if they no longer fit) the stored interval is kept, with a warning.
        """
        method = bootstrap.get("method", 1)
        try:
            if not self.records:
                raise ValueError("the file stores no records")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CapacityGapWarning)
                refit = type(self).fit(
                    self.records, n_bootstrap=bootstrap["n"], seed=bootstrap["seed"], through_origin=self.through_origin
                )
        except (ValueError, KeyError, TypeError) as err:
            warnings.warn(
                f"{where} was saved with interval method {method!r} (this hf_capgap uses {INTERVAL_METHOD}), whose "
                f"interval can be too narrow (zero-width with two student sizes), and it cannot be recomputed: {err}. "
                "Its interval is kept as saved; refit the law with `hf-capgap law fit` from its ledger.",
                CapacityGapWarning,
                stacklevel=4,
            )
            return
        self.ratio_ci = refit.ratio_ci
        self.band_draws, self.band_percentiles = refit.band_draws, refit.band_percentiles
        self.n_bootstrap, self.seed = refit.n_bootstrap, refit.seed
        warnings.warn(
            f"{where} was saved with interval method {method!r} (this hf_capgap uses {INTERVAL_METHOD}); its interval "
            f"was recomputed from its {len(self.records)} stored records (n_bootstrap={refit.n_bootstrap}, "
            f"seed={refit.seed}). Save the law again to store the recomputed interval.",
            CapacityGapWarning,
            stacklevel=4,
        )

    @classmethod
    def _from_fields(cls, data: Mapping[str, Any]) -> CapacityGapLaw:
        bootstrap = data["bootstrap"]
        return cls(
            ratio=data["ratio"],
            ratio_ci=data["ratio_ci"],
            source=data["source"],
            through_origin=data["through_origin"],
            slope_affine=data["slope_affine"],
            intercept=data["intercept"],
            r2=data["r2"],
            r2_affine=data["r2_affine"],
            optima=[Optimum(**{**o, "points_used": tuple(o["points_used"])}) for o in data["optima"]],
            records=data["records"],
            families=data["families"],
            band_draws=None if bootstrap is None else np.asarray(bootstrap["draws"], dtype=float),
            band_percentiles=None if bootstrap is None else tuple(bootstrap["percentiles"]),
            n_bootstrap=None if bootstrap is None else bootstrap["n"],
            seed=None if bootstrap is None else bootstrap["seed"],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the law as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CapacityGapLaw:
        """Read a law written by :meth:`save`; refuses another format version by name."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no law file at {path}; write one with `hf-capgap law fit`.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path} is not valid JSON ({err}); refit the law.") from err
        try:
            return cls._from_dict(data, str(path))
        except ArtifactError as err:
            raise ArtifactError(f"{path}: {err}") from err

    # ------------------------------------------------------------------ reporting

    def formula(self, *, affine: bool | None = None) -> str:
        """The line predictions use (or the affine one when ``affine=True``), e.g. ``t* = 2.5 x s``."""
        use_affine = not self.through_origin if affine is None else affine
        if use_affine:
            sign = "+" if self.intercept >= 0 else "-"
            return f"t* = {self.slope_affine:.3g} x s {sign} {format_params(abs(self.intercept))}"
        return f"t* = {self.ratio:.3g} x s"

    def summary(self) -> str:
        """A few lines for a terminal: the law, its fit quality and the per-student optima."""
        lines = [f"law of capacity gap ({self.source}): t* = {self.ratio:.3g} x s"]
        if self.ratio_ci is not None:
            lines[0] += f"   {CONFIDENCE:.0%} CI [{self.ratio_ci[0]:.3g}, {self.ratio_ci[1]:.3g}]"
        if self.r2 is not None:
            lines.append(f"R^2 (log t*): {self.r2:.3f}")
        if self.slope_affine is not None and self.intercept is not None:
            lines.append(f"affine: {self.formula(affine=True)}   R^2 (log t*): {self.r2_affine:.3f}")
        lines.append(f"predictions use the {'through-origin' if self.through_origin else 'affine'} line")
        if self.source == "paper":
            lines.append(f"families: {', '.join(self.families)}; {self.citation}")
        if self.optima:
            lines.append(f"{'student':>9} {'t*':>9} {'t*/s':>6} {'loss':>8}  bracket")
            for optimum in self.optima:
                bracket = "-".join(
                    format_params(t) for t in (optimum.points_used[0], optimum.points_used[-1])
                )
                status = bracket if optimum.interior else f"excluded: {optimum.note}"
                lines.append(
                    f"{format_params(optimum.student_params):>9} {format_params(optimum.teacher_params):>9} "
                    f"{optimum.teacher_params / optimum.student_params:>6.2f} {optimum.loss:>8.4f}  {status}"
                )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, *, mark: tuple[float, float] | None = None) -> None:
        """Save a PNG: loss vs teacher size per student with the fitted minima, and t* vs s.

        A paper-prior law has no measurements, so only the line is drawn. ``mark`` = (student params,
        teacher params) places one distilled pair on the line panel, e.g. for its model card. An
        affine law is drawn only over the student sizes where it predicts a teacher larger than the
        student (a negative intercept rules out the smallest sizes).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = 2 if self.records else 1
        figure = Figure(figsize=(6.5 * panels, 5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, panels, squeeze=False)[0]
        if self.records:
            _draw_curves(axes[0], self.records, self.optima)
        self._plot_line(axes[-1], mark)
        _save_png(figure, path)

    # ------------------------------------------------------------------ internals

    def _line(self) -> tuple[float, float]:
        if self.through_origin:
            return self.ratio, 0.0
        return float(self.slope_affine), float(self.intercept)

    def _band(self, band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interval across bootstrap draws (rows) for each queried size (columns)."""
        lo, hi = np.percentile(band, self.band_percentiles, axis=0)
        return lo, hi

    def _option(self, student: float, teacher: float, optimum: Prediction) -> TeacherOption:
        in_interval = None if optimum.lo is None else bool(optimum.lo <= teacher <= optimum.hi)
        return TeacherOption(
            teacher_params=teacher,
            ratio=teacher / student,
            log_distance=math.log(teacher / float(optimum.params)),
            in_interval=in_interval,
        )

    def _reason(
        self,
        student: float,
        optimum: Prediction,
        choice: TeacherOption,
        alternatives: tuple[TeacherOption, ...],
        excluded: tuple[float, ...],
    ) -> str:
        best = float(optimum.params)
        origin = "published" if self.source == "paper" else "fitted"
        text = (
            f"For a {format_params(student)} student the {origin} law ({self.formula()}) puts the best "
            f"teacher at {format_params(best)}"
        )
        if optimum.lo is not None:
            low, high = format_params(float(optimum.lo)), format_params(float(optimum.hi))
            text += f" ({CONFIDENCE:.0%} interval {low}-{high})"
        text += (
            f". {format_params(choice.teacher_params)} is the closest available teacher: "
            f"{_relative(choice)}, a teacher/student ratio of {choice.ratio:.2f}."
        )
        if alternatives:
            listed = "; ".join(
                f"{format_params(option.teacher_params)} ({_relative(option)}, ratio {option.ratio:.2f})"
                for option in alternatives
            )
            text += f" Alternatives: {listed}."
        if excluded:
            unusable = ", ".join(format_params(t) for t in excluded)
            text += f" Not larger than the student, so not usable: {unusable}."
        return text

    def _plot_line(self, axis: Any, mark: tuple[float, float] | None = None) -> None:
        interior = [optimum for optimum in self.optima if optimum.interior]
        if interior:
            students = np.array([optimum.student_params for optimum in interior])
            low, high = students.min() / 1.5, students.max() * 1.5
        else:
            low, high = 5e7, 5e9
        if mark is not None:
            low, high = min(low, mark[0] / 1.5), max(high, mark[0] * 1.5)
        grid = np.geomspace(low, high, 400)
        slope, intercept = self._line()
        valid = grid[slope * grid + intercept > grid]  # an affine law predicts no teacher below some size
        if valid.size:
            prediction = self.predict(valid)
            axis.plot(valid, prediction.params, color="C0", lw=2, label=f"{self.formula()} ({self.source})")
            if prediction.lo is not None:
                axis.fill_between(
                    valid,
                    prediction.lo,
                    prediction.hi,
                    color="C0",
                    alpha=0.2,
                    label=f"{CONFIDENCE:.0%} bootstrap band",
                )
        if interior:
            axis.plot(
                students,
                [optimum.teacher_params for optimum in interior],
                "o",
                color="black",
                label="fitted t*(s)",
            )
        if self.source != "paper":
            axis.plot(grid, PAPER_RATIO * grid, ":", color="grey", label=f"paper: t* = {PAPER_RATIO} s")
        if mark is not None:
            axis.plot(*mark, "*", color="red", ms=14, mec="black",
                      label=f"this pair: {format_params(mark[0])} from {format_params(mark[1])}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("student parameters s")
        axis.set_ylabel("optimal teacher parameters t*")
        axis.set_title(
            "Law of capacity gap"
            if self.source != "paper"
            else "Law of capacity gap: published prior (no interval)"
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    def __repr__(self) -> str:
        ci = "" if self.ratio_ci is None else f", ratio_ci=({self.ratio_ci[0]:.3g}, {self.ratio_ci[1]:.3g})"
        return f"CapacityGapLaw(ratio={self.ratio:.3g}{ci}, source={self.source!r})"


# ---------------------------------------------------------------------- record handling


def plot_measurements(records: str | os.PathLike | Iterable[Mapping[str, Any]] | Any, path: str | os.PathLike) -> None:
    """Save the loss-vs-teacher curves alone, with each student's best teacher marked.

    What to look at when :meth:`CapacityGapLaw.fit` refuses the records (too few bracketed optima):
    the curves show where the grid needs more teachers. Same record formats as ``fit``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _validated_records(_read_records(records))
    optima = [_locate_optimum(student, curve) for student, curve in sorted(_curves(rows).items())]
    figure = Figure(figsize=(6.5, 5), layout="constrained")
    FigureCanvasAgg(figure)
    _draw_curves(figure.subplots(), rows, optima)
    _save_png(figure, path)


def _draw_curves(axis: Any, rows: Sequence[Mapping[str, Any]], optima: Sequence[Optimum]) -> None:
    from matplotlib import colormaps

    curves = _curves(rows)
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(optima), 1)))
    for colour, optimum in zip(colours, optima, strict=True):
        teachers, losses = curves[optimum.student_params]
        label = f"student {format_params(optimum.student_params)}"
        axis.plot(teachers, losses, "o-", color=colour, lw=1.2, ms=4, label=label)
        if optimum.interior:
            used = np.isin(teachers, optimum.points_used)
            x = np.log(teachers[used])
            coefficients = np.polyfit(x, losses[used], 2)
            grid = np.linspace(x[0], x[-1], 50)
            axis.plot(np.exp(grid), np.polyval(coefficients, grid), "--", color=colour, lw=1)
            axis.plot(optimum.teacher_params, optimum.loss, "*", color=colour, ms=14, mec="black")
        else:
            axis.plot(optimum.teacher_params, optimum.loss, "X", color="red", ms=9, mec="black")
    axis.set_xscale("log")
    axis.set_xlabel("teacher parameters")
    axis.set_ylabel("student held-out loss")
    axis.set_title("Loss vs teacher size (* fitted minimum, X excluded: edge of grid)")
    axis.title.set_fontsize(10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)


def _save_png(figure: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _read_records(records: Any) -> list[Mapping[str, Any]]:
    if isinstance(records, (str, os.PathLike)):
        return read_ledger(records)
    if hasattr(records, "columns") and hasattr(records, "to_dict"):
        return records.to_dict("records")
    if isinstance(records, Mapping):
        raise ValueError("records must be a ledger path, a list of dicts or a DataFrame, not a single dict.")
    return list(records)


def _validated_records(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not rows:
        raise ValueError(
            "no sweep records: the law needs evaluated (student_params, teacher_params, eval_loss) records."
        )
    clean = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"record {index} is a {type(row).__name__}, not a dict of fields.")
        missing = [field for field in REQUIRED_FIELDS if field not in row or row[field] is None]
        if missing:
            raise ValueError(
                f"record {index} lacks {', '.join(missing)}; every record needs {', '.join(REQUIRED_FIELDS)}."
            )
        student = _record_size(row, "student_params", index)
        teacher = _record_size(row, "teacher_params", index)
        if teacher <= student:
            raise ValueError(
                f"record {index}: teacher_params ({format_params(teacher)}) must be larger than "
                f"student_params ({format_params(student)}); the student is pruned from its teacher."
            )
        try:
            loss = float(row["eval_loss"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"record {index}: eval_loss {row['eval_loss']!r} is not a number.") from err
        if not math.isfinite(loss):
            raise ValueError(
                f"record {index} (student {format_params(student)}, teacher {format_params(teacher)}): "
                f"eval_loss is {loss}; rerun that evaluation or drop the record."
            )
        record = {"student_params": student, "teacher_params": teacher, "eval_loss": loss}
        if isinstance(row.get("family"), str):
            record["family"] = row["family"]
        clean.append(record)
    return clean


def _record_size(row: Mapping[str, Any], field: str, index: int) -> float:
    try:
        return parse_params(row[field])
    except ValueError as err:
        raise ValueError(f"record {index}: {field}: {err}") from err


STUDENT_SIZE_TOLERANCE = 0.02
"""Students within 2% of each other are one size: pruning hits a target within 2%, so the "same"
student cut from different teachers has slightly different exact counts."""


def _student_groups(sizes: Iterable[float]) -> dict[float, float]:
    """Map every student size to its group's median, grouping sorted sizes within the tolerance."""
    groups: list[list[float]] = []
    for size in sorted(set(sizes)):
        if groups and size <= groups[-1][0] * (1 + STUDENT_SIZE_TOLERANCE):
            groups[-1].append(size)
        else:
            groups.append([size])
    return {size: float(np.median(group)) for group in groups for size in group}


def _curves(rows: Sequence[Mapping[str, Any]]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Per student size: sorted teacher sizes and the mean loss at each (repeats are averaged)."""
    group_of = _student_groups(row["student_params"] for row in rows)
    grouped: dict[float, dict[float, list[float]]] = {}
    for row in rows:
        grouped.setdefault(group_of[row["student_params"]], {}).setdefault(row["teacher_params"], []).append(
            row["eval_loss"]
        )
    return {
        student: (
            np.array(sorted(by_teacher)),
            np.array([np.mean(by_teacher[t]) for t in sorted(by_teacher)]),
        )
        for student, by_teacher in grouped.items()
    }


# ---------------------------------------------------------------------- fitting


def _locate_optimum(student: float, curve: tuple[np.ndarray, np.ndarray]) -> Optimum:
    """The vertex of a quadratic in log t through the best teacher and its neighbours, or why not."""
    teachers, losses = curve
    best = int(np.argmin(losses))
    note = _unbracketed(student, teachers, best)
    if note is not None:
        return Optimum(
            student, float(teachers[best]), float(losses[best]), tuple(map(float, teachers)), False, note
        )
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
        warnings.warn(f"excluded from the fit: {note}", CapacityGapWarning, stacklevel=3)


def _fit_ratio(students: np.ndarray, teachers: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(teachers / students))))


def _fit_affine(students: np.ndarray, teachers: np.ndarray) -> tuple[float, float]:
    """Least squares on relative residuals: rows divided by t* so every student weighs the same."""
    design = np.column_stack([students / teachers, 1 / teachers])
    (slope, intercept), *_ = np.linalg.lstsq(design, np.ones_like(teachers), rcond=None)
    return float(slope), float(intercept)


def _r2_log(teachers: np.ndarray, predicted: np.ndarray) -> float:
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


# ---------------------------------------------------------------------- small helpers


def _positive_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, str):
        values = parse_params(values)
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass one or more parameter counts.")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be positive, finite parameter counts, got {values!r}.")
    return array.reshape(-1)


def _prediction(
    params: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None, shape: tuple[int, ...]
) -> Prediction:
    """Give back floats for a scalar query and arrays shaped like the query otherwise."""
    if shape == ():
        return Prediction(
            float(params[0]), None if lo is None else float(lo[0]), None if hi is None else float(hi[0])
        )
    return Prediction(
        params.reshape(shape),
        None if lo is None else lo.reshape(shape),
        None if hi is None else hi.reshape(shape),
    )


def _relative(option: TeacherOption) -> str:
    factor = math.exp(option.log_distance)
    if abs(option.log_distance) < 1e-9:
        return "exactly the optimum"
    side = "above" if option.log_distance > 0 else "below"
    inside = (
        ""
        if option.in_interval is None
        else (", inside the interval" if option.in_interval else ", outside the interval")
    )
    return f"{max(factor, 1 / factor):.2f}x {side} the optimum{inside}"
