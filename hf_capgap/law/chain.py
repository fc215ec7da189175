"""Teacher assistants: the chain of model sizes from a teacher too big for a student down to it.

A teacher far past the law's optimum gives a worse student than a smaller one would (TAKD: Mirzadeh
et al. 2020). The remedy is to distil it into assistants, each within the law's reach of the model
above it. This module plans the sizes; building the chain (pruning and distilling each assistant) is
the recipe's job.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_capgap.errors import ConfigError
from hf_capgap.law.fit import CapacityGapWarning
from hf_capgap.law.params import format_params, parse_params

if TYPE_CHECKING:
    from hf_capgap.law.law import CapacityGapLaw

MAX_STEPS = 64
"""More steps than this means the law cannot bridge the pair (an affine law past the end of its range)."""

NEAR_ONE = 1.1
"""An affine law allowing a step ratio below this is near the end of its range: the plan comes with a warning."""

_TOLERANCE = 1e-9
"""Relative slack so that a ratio equal to the bound up to rounding (e.g. 6.25 = 2.5 x 2.5) counts as within it."""


@dataclass(frozen=True)
class ChainPlan:
    """Sizes from the teacher down to the student, with each step's ratio and the law's bound for it.

    ``sizes`` runs teacher -> assistants -> student; ``ratios[i]`` is ``sizes[i] / sizes[i + 1]`` (equal
    unless an affine law's bound only admits unequal steps) and ``limits[i]`` the largest ratio the law
    allows for a student of ``sizes[i + 1]``.
    ``within_reach`` means the teacher needs no assistant: ``sizes`` is (teacher, student).
    """

    sizes: tuple[float, ...]
    ratios: tuple[float, ...]
    limits: tuple[float, ...]
    within_reach: bool
    law: str
    bound: str

    @property
    def teacher(self) -> float:
        return self.sizes[0]

    @property
    def student(self) -> float:
        return self.sizes[-1]

    @property
    def assistants(self) -> tuple[float, ...]:
        """The assistant sizes, largest first; empty when the teacher is within reach."""
        return self.sizes[1:-1]

    def summary(self) -> str:
        """One line per model (its size, role, and the ratio to the model above it), then the law used."""
        lines = [f"{format_params(self.teacher):>7}  teacher"]
        roles = [f"assistant {number}" for number in range(1, len(self.assistants) + 1)] + ["student"]
        for above, size, role, ratio, limit in zip(
            self.sizes[:-1], self.sizes[1:], roles, self.ratios, self.limits, strict=True
        ):
            lines.append(
                f"{format_params(size):>7}  {role:<12} distilled from {format_params(above)}, "
                f"ratio {ratio:.3g} (the law allows up to {limit:.3g})"
            )
        if self.within_reach:
            lines.append("the teacher is within reach: no assistant needed")
        lines.append(f"law: {self.law}; a step may go up to {self.bound}")
        return "\n".join(lines)


def plan_chain(law: CapacityGapLaw, student_params: float | str, teacher_params: float | str) -> ChainPlan:
    """The fewest steps from ``teacher_params`` down to ``student_params`` within ``law``, equal where they fit.

    A step is within reach when its teacher is at most the law's upper bound for its student s: the
    larger of the point prediction and the upper end of its interval (``ratio_ci``'s upper end times s
    for a through-origin law, the bootstrap band's upper end for an affine one; a percentile interval
    need not contain its point estimate), or the point prediction where the law has no interval (the
    paper prior: k = 2.5, since the paper reports no range). The chain is built greedily from the
    student up, each assistant as large as the law allows: s_{i+1} = min(teacher, upper(s_i)). Where
    upper(s) grows with s (a positive slope), no chain has fewer steps. With n such steps, equal ratios
    r = R ** (1 / n) (R = teacher / student) are used instead when every one of them is within reach too: always for a
    through-origin law (n = ceil(log R / log k_hi)), and for an affine law only where they fit, since
    its allowed ratio varies with size. n = 1 means the teacher is within reach and there is no
    assistant. A bound that is not a finite number above 1 is refused, as is a chain through student
    sizes outside an affine law's valid range or longer than ``MAX_STEPS``; an affine chain through sizes
    where the law allows ratios barely above 1 (near the end of the line's range) is returned with a warning.
    """
    student, teacher = parse_params(student_params), parse_params(teacher_params)
    if student >= teacher:
        raise ConfigError(
            f"the student ({format_params(student)}) must be smaller than the teacher ({format_params(teacher)}): "
            "a chain runs from a larger teacher down to the student."
        )
    _check_bound(law)
    ascending = _greedy_sizes(law, student, teacher)
    steps = len(ascending) - 1
    ratio = (teacher / student) ** (1 / steps)
    equal = _equal_steps_fit(law, student, teacher, ratio, steps)
    if equal:
        ascending = [student, *(student * ratio**i for i in range(1, steps)), teacher]
    sizes = np.array(ascending, dtype=float)
    ratios = np.full(steps, ratio) if equal else sizes[1:] / sizes[:-1]
    limits = _ratio_limits(law, sizes[:-1], student, teacher)
    if not law.through_origin and np.any(limits < NEAR_ONE):
        warnings.warn(
            f"the chain from {format_params(teacher)} down to {format_params(student)} has steps whose teacher "
            f"the law allows to be only {limits.min():.3g} times its student: the affine law {law.formula()} is "
            "near the end of its range there, so those assistants gain little.",
            CapacityGapWarning,
            stacklevel=3,
        )
    return ChainPlan(
        sizes=tuple(float(size) for size in reversed(sizes)),
        ratios=tuple(float(step_ratio) for step_ratio in reversed(ratios)),
        limits=tuple(float(limit) for limit in reversed(limits)),
        within_reach=steps == 1,
        law=f"{law.source}, {law.formula()}",
        bound=_bound(law),
    )


def _greedy_sizes(law: CapacityGapLaw, student: float, teacher: float) -> list[float]:
    """Student -> teacher, each step's teacher the largest the law allows for its student (the fewest steps)."""
    sizes = [student]
    while len(sizes) <= MAX_STEPS:
        reach = sizes[-1] * float(_ratio_limits(law, np.array(sizes[-1:]), student, teacher)[0])
        if teacher <= reach * (1 + _TOLERANCE):
            return [*sizes, teacher]
        if reach <= sizes[-1]:
            break
        sizes.append(reach)
    _ratio_limits(law, np.array([teacher]), student, teacher)  # a teacher past the affine range: say so
    raise ConfigError(
        f"no chain of at most {MAX_STEPS} steps from {format_params(teacher)} down to {format_params(student)} "
        f"stays within the law {law.formula()}: each step's teacher may be at most {_bound(law)}, and "
        f"{MAX_STEPS} such steps reach only {format_params(sizes[-1])}."
    )


def _equal_steps_fit(law: CapacityGapLaw, student: float, teacher: float, ratio: float, steps: int) -> bool:
    """Whether ``steps`` equal steps of ``ratio`` each stay within the law (an affine law may not allow them)."""
    try:
        limits = _ratio_limits(law, student * ratio ** np.arange(steps), student, teacher)
    except ConfigError:
        return False
    return bool(np.all(ratio <= limits * (1 + _TOLERANCE)))


def _check_bound(law: CapacityGapLaw) -> None:
    """Refuse a through-origin law whose step bound is not a finite ratio above 1: no chain could use it."""
    if not law.through_origin:
        return
    bound = law.ratio if law.ratio_ci is None else max(law.ratio, law.ratio_ci[1])
    if not math.isfinite(bound) or bound <= 1:
        low, high = law.ratio_ci or (None, None)
        interval = "no interval" if law.ratio_ci is None else f"interval [{low:.3g}, {high:.3g}]"
        raise ConfigError(
            f"the law {law.formula()} (k = {law.ratio:.3g}, {interval}) allows a teacher/student ratio of at most "
            f"{bound:.3g}; a chain needs a finite bound above 1. Refit the law."
        )


def _ratio_limits(law: CapacityGapLaw, step_students: np.ndarray, student: float, teacher: float) -> np.ndarray:
    """The largest teacher/student ratio the law allows for each step student."""
    try:
        prediction = law.predict(step_students)
    except ConfigError as error:
        raise ConfigError(
            f"cannot plan a chain from {format_params(teacher)} down to {format_params(student)} "
            f"with the law {law.formula()}: {error}"
        ) from error
    upper = prediction.params if prediction.hi is None else np.maximum(prediction.params, prediction.hi)
    limits = np.asarray(upper, dtype=float) / step_students
    if not np.all(np.isfinite(limits)):
        raise ConfigError(
            f"cannot plan a chain from {format_params(teacher)} down to {format_params(student)}: the law "
            f"{law.formula()} gives no finite upper bound for {_bound(law)}; refit the law."
        )
    return limits


def _bound(law: CapacityGapLaw) -> str:
    """Which bound the steps were held to, in words."""
    if law.through_origin:
        if law.ratio_ci is not None:
            low, high = law.ratio_ci
            if law.ratio > high:
                return f"the point estimate k = {law.ratio:.3g}, above its interval [{low:.3g}, {high:.3g}]"
            return f"the upper end of k's interval [{low:.3g}, {high:.3g}]"
        reason = "the paper reports no interval" if law.source == "paper" else "the law carries no interval"
        return f"the point estimate k = {law.ratio:.3g} ({reason})"
    if law.band_draws is not None:
        return "the upper end of the affine law's bootstrap band (or its line, where higher) at each step's student"
    return "the affine line's prediction for each step's student (the law carries no band)"
