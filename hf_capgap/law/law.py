"""The law of capacity gap: t*(s), the teacher size that distils the best student of size s.

For each student size s, students pruned from and distilled by teachers of several sizes t are
evaluated on held-out data; the best teacher t*(s) is where that held-out loss is lowest. The law
says t* grows linearly with s; Zhang et al. (2023) found t* ~ 2.5 s on GPT-2 and Pythia.
:class:`CapacityGapLaw` is what users hold; the fit (``fit.py``), the file format (``storage.py``)
and the plots (``plot.py``) live beside it. Numbers only: a user fits or queries the law on a laptop
without the training stack.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_capgap.errors import ConfigError
from hf_capgap.law.chain import ChainPlan, plan_chain
from hf_capgap.law.fit import CONFIDENCE, INTERVAL_METHOD, Optimum, fit_fields
from hf_capgap.law.paper import CITATION, PAPER_FAMILIES, PAPER_RATIO
from hf_capgap.law.params import format_params, parse_params
from hf_capgap.law.storage import law_fields, law_to_dict, read_law_file, recompute_interval
from hf_capgap.utils.artifacts import ArtifactError, atomic_write_json


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
    query it with :meth:`predict`, :meth:`suggest`, :meth:`student_for` and :meth:`chain`.
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
        interval_method: int = INTERVAL_METHOD,
    ) -> None:
        if not through_origin and (slope_affine is None or intercept is None):
            raise ConfigError("an affine law (through_origin=False) needs slope_affine and intercept.")
        self.ratio = float(ratio)
        self.ratio_ci = None if ratio_ci is None else (float(ratio_ci[0]), float(ratio_ci[1]))
        _check_ratio(self.ratio, self.ratio_ci)
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
        self.interval_method = interval_method
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
        bootstrap ``hf_capgap.law.fit`` describes: with two student sizes ``ratio_ci`` spans their two
        ratios t*/s, and an affine law carries no band.
        """
        return cls(
            **fit_fields(records, n_bootstrap=n_bootstrap, seed=seed, through_origin=through_origin), source="fitted"
        )

    # ------------------------------------------------------------------ queries

    def predict(self, student_params: float | Sequence[float] | np.ndarray) -> Prediction:
        """The optimal teacher size for ``student_params`` (scalar or array), with its interval.

        The interval of a through-origin law is ``ratio_ci`` times the student size; an affine law's
        comes from its bootstrap draws of (slope, intercept).
        """
        students = _positive_array(student_params, "student_params")
        slope, intercept = self.line()
        teachers = slope * students + intercept
        if np.any(teachers <= students):
            raise ConfigError(
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
        slope, intercept = self.line()
        students = (teachers - intercept) / slope
        if np.any(students <= 0):
            raise ConfigError(
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
            raise ConfigError("available_teachers is empty; pass the teacher sizes you can use.")
        usable = [teacher for teacher in offered if teacher > student]
        excluded = tuple(teacher for teacher in offered if teacher <= student)
        if not usable:
            raise ConfigError(
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

    def chain(self, student_params: float | str, teacher_params: float | str) -> ChainPlan:
        """The teacher-assistant sizes from a teacher too big for the student down to it.

        The fewest steps (equal geometric ones where they fit), each teacher at most the upper end of the
        law's interval for its student (the point estimate where the law has none, as for the paper prior); empty
        ``assistants`` when the teacher is within reach. :func:`hf_capgap.law.chain.plan_chain` says
        exactly how. Refuses a student not smaller than the teacher, and sizes that are not positive.
        """
        return plan_chain(self, student_params, teacher_params)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the law (and to describe it on a model card), JSON-able."""
        return law_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapacityGapLaw:
        """Rebuild a law from :meth:`to_dict`; refuses another kind or format version by name.

        A law saved before ``bootstrap.method`` was recorded gets its interval recomputed from its
        stored records (see :data:`INTERVAL_METHOD`), with a warning.
        """
        return cls._from_dict(data, "the law")

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], where: str) -> CapacityGapLaw:
        law = cls(**law_fields(data))
        bootstrap = data["bootstrap"]
        if isinstance(bootstrap, Mapping) and bootstrap.get("method") != INTERVAL_METHOD:
            recompute_interval(law, bootstrap, where)
        return law

    def save(self, path: str | os.PathLike) -> None:
        """Write the law as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CapacityGapLaw:
        """Read a law written by :meth:`save`; refuses another format version by name."""
        path = Path(path)
        data = read_law_file(path)
        try:
            return cls._from_dict(data, str(path))
        except (ArtifactError, ConfigError) as err:
            raise type(err)(f"{path}: {err}") from err

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
                bracket = "-".join(format_params(t) for t in (optimum.points_used[0], optimum.points_used[-1]))
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
        from hf_capgap.law.plot import plot_law

        plot_law(self, path, mark=mark)

    def line(self) -> tuple[float, float]:
        """(slope, intercept) of the line predictions use."""
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

    def __repr__(self) -> str:
        ci = "" if self.ratio_ci is None else f", ratio_ci=({self.ratio_ci[0]:.3g}, {self.ratio_ci[1]:.3g})"
        return f"CapacityGapLaw(ratio={self.ratio:.3g}{ci}, source={self.source!r})"


def _check_ratio(ratio: float, ratio_ci: tuple[float, float] | None) -> None:
    """Refuse a k or an interval that no query could use: not finite, or its ends swapped.

    The point estimate may lie outside its interval (a percentile bootstrap can put it there): that is allowed.
    """
    if not math.isfinite(ratio):
        raise ConfigError(f"the law's ratio k must be a finite number, got {ratio}; refit the law.")
    if ratio_ci is None:
        return
    low, high = ratio_ci
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ConfigError(
            f"the law's interval of k must be two finite numbers, low before high, got [{low}, {high}]; refit the law."
        )


def _positive_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, str):
        values = parse_params(values)
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ConfigError(f"{name} is empty; pass one or more parameter counts.")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ConfigError(f"{name} must be positive, finite parameter counts, got {values!r}.")
    return array.reshape(-1)


def _prediction(
    params: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None, shape: tuple[int, ...]
) -> Prediction:
    """Give back floats for a scalar query and arrays shaped like the query otherwise."""
    if shape == ():
        return Prediction(float(params[0]), None if lo is None else float(lo[0]), None if hi is None else float(hi[0]))
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
