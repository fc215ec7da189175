"""Teacher assistants: the chain of model sizes from a teacher too big for a student down to it.

A teacher far past the law's optimum gives a worse student than a smaller one would (TAKD: Mirzadeh
et al. 2020). The remedy is to distil it into assistants, each within the law's reach of the model
above it. This module plans the sizes; building the chain (pruning and distilling each assistant) is
the recipe's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hf_capgap.errors import ConfigError
from hf_capgap.law.params import format_params, parse_params

if TYPE_CHECKING:
    from hf_capgap.law.law import CapacityGapLaw

MAX_STEPS = 64
"""More equal steps than this means the law cannot bridge the pair (an affine law near the end of its range)."""

_TOLERANCE = 1e-9
"""Relative slack so that a ratio equal to the bound up to rounding (e.g. 6.25 = 2.5 x 2.5) counts as within it."""


@dataclass(frozen=True)
class ChainPlan:
    """Sizes from the teacher down to the student, with each step's ratio and the law's bound for it.

    ``sizes`` runs teacher -> assistants -> student; ``ratios[i]`` is ``sizes[i] / sizes[i + 1]`` (all
    equal) and ``limits[i]`` the largest ratio the law allows for a student of ``sizes[i + 1]``.
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
    """The fewest equal geometric steps from ``teacher_params`` down to ``student_params`` within ``law``.

    With R = teacher / student, n steps have the common ratio r = R ** (1 / n) and step students
    s_i = student * r**i (i = 0 .. n-1). A step is within reach when its teacher r * s_i is at most the
    law's upper bound for s_i: the upper end of the interval ``law.predict(s_i)`` gives (``ratio_ci``'s
    upper end times s_i for a through-origin law, the bootstrap band's upper end for an affine one), or
    the point prediction where the law has no interval (the paper prior: k = 2.5, since the paper
    reports no range). The plan is the smallest n for which every step is within reach; n = 1 means the
    teacher is within reach and there is no assistant. For a through-origin law that is
    n = ceil(log R / log k_hi). An affine law's bound varies with size, so each n is checked step by
    step; a step student outside its valid range (no teacher larger than the student) is refused.
    Ratios are equal by construction, so a pair that falls between k_hi**(n-1) and k_lo**n gets steps
    below the interval's lower end rather than above its upper end.
    """
    student, teacher = parse_params(student_params), parse_params(teacher_params)
    if student >= teacher:
        raise ConfigError(
            f"the student ({format_params(student)}) must be smaller than the teacher ({format_params(teacher)}): "
            "a chain runs from a larger teacher down to the student."
        )
    total = teacher / student
    for steps in range(1, MAX_STEPS + 1):
        ratio = total ** (1 / steps)
        step_students = student * ratio ** np.arange(steps)
        limits = _ratio_limits(law, step_students, student, teacher)
        if np.all(ratio <= limits * (1 + _TOLERANCE)):
            break
    else:
        tightest = int(np.argmin(limits / ratio))
        raise ConfigError(
            f"no chain of at most {MAX_STEPS} equal steps from {format_params(teacher)} down to "
            f"{format_params(student)} stays within the law {law.formula()}: with {MAX_STEPS} steps of ratio "
            f"{ratio:.3g}, it allows only {limits[tightest]:.3g} for the {format_params(step_students[tightest])} "
            "student, so a longer chain of smaller steps would be needed."
        )
    ascending = [student, *(student * ratio**i for i in range(1, steps)), teacher]
    return ChainPlan(
        sizes=tuple(float(size) for size in reversed(ascending)),
        ratios=(float(ratio),) * steps,
        limits=tuple(float(limit) for limit in reversed(limits)),
        within_reach=steps == 1,
        law=f"{law.source}, {law.formula()}",
        bound=_bound(law),
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
    upper = prediction.params if prediction.hi is None else prediction.hi
    return np.asarray(upper, dtype=float) / step_students


def _bound(law: CapacityGapLaw) -> str:
    """Which bound the steps were held to, in words."""
    if law.through_origin:
        if law.ratio_ci is not None:
            low, high = law.ratio_ci
            return f"the upper end of k's interval [{low:.3g}, {high:.3g}]"
        reason = "the paper reports no interval" if law.source == "paper" else "the law carries no interval"
        return f"the point estimate k = {law.ratio:.3g} ({reason})"
    if law.band_draws is not None:
        return "the upper end of the affine law's bootstrap band at each step's student"
    return "the affine line's prediction for each step's student (the law carries no band)"
