"""Teacher assistants (TAKD) in the MiniMA recipe: the chain teacher -> assistants -> student, planned.

``assistants: auto`` asks the recipe's law for the sizes (:meth:`CapacityGapLaw.chain`); a list names them.
Each planned size is an exact float; the run prunes each assistant from the model above it, so its shape
is the one :func:`hf_capgap.pruning.shape_for_target` picks from that model's config, and its parameter
count is what that shape holds (within pruning's 2% of the target). All of it on the meta device.

Every stage of the chain is an ordinary teacher -> student stage of the recipe: :func:`stage_plans`
gives each one a :class:`Plan` whose teacher is the model above it, so the prune and distill stages run
unchanged on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.minima.config import AUTO_ASSISTANTS, NO_ASSISTANTS, MinimaConfig


@dataclass(frozen=True)
class Assistant:
    """One planned assistant: its name in the chain, the size asked for and the pruned shape that gets it."""

    name: str  # "assistant-1", the largest first
    target_params: float  # the law's (or the list's) exact size
    params: int  # what the pruned shape holds
    shape: dict[str, int]
    tokens: int  # the token budget of its distillation


def plan_assistants(config: MinimaConfig, law: Any, teacher: Any, student_params: int) -> tuple[Assistant, ...]:
    """The assistants between ``teacher`` (a model on the meta device) and a student of ``student_params``.

    'none' gives none; 'auto' the law's chain (none when the teacher is within the law's reach); a list
    is refused unless every size lies strictly between the student and the teacher.
    """
    from hf_capgap.law import format_params
    from hf_capgap.utils.parameters import count_model_parameters

    word = config.assistants.strip().lower()
    if word == NO_ASSISTANTS:
        return ()
    teacher_params = count_model_parameters(teacher)
    if word == AUTO_ASSISTANTS:
        sizes = law.chain(student_params, teacher_params).assistants
    else:
        sizes = config.assistant_sizes
        outside = [size for size in sizes if not student_params < size < teacher_params]
        if outside:
            raise ConfigError(
                f"assistants={config.assistants!r}: {', '.join(format_params(size) for size in outside)} is not "
                f"strictly between the student ({format_params(student_params)}) and the teacher "
                f"({format_params(teacher_params)}); list sizes between them, largest first."
            )
    assistants = []
    above = teacher
    for number, size in enumerate(sizes, start=1):
        try:
            shape, above = _pruned_skeleton(above, size)
        except ConfigError as err:
            raise ConfigError(
                f"assistants={config.assistants!r}: assistant {number} ({format_params(size)}) cannot be pruned "
                f"from the model above it: {err} Choose other assistant sizes."
            ) from None
        params = count_model_parameters(above)
        if not student_params < params:
            raise ConfigError(
                f"assistants={config.assistants!r}: assistant {number} ({format_params(size)}) prunes to "
                f"{params:,} parameters, not above the student's {student_params:,}; choose larger assistants."
            )
        assistants.append(Assistant(f"assistant-{number}", float(size), params, shape, config.assistant_token_count))
    if assistants and config.student_shape is not None:  # the student is cut from the last assistant
        from hf_capgap.pruning import PruneShape
        from hf_capgap.pruning.layouts import validate_shape

        validate_shape(above.config, PruneShape.from_value(config.student_shape))
    return tuple(assistants)


def _pruned_skeleton(above: Any, size: float) -> tuple[dict[str, int], Any]:
    """The shape pruning picks for ``size`` from ``above``, and the meta-device model of that shape."""
    from hf_capgap.pruning import shape_for_target
    from hf_capgap.pruning.layouts import meta_model, pruned_config

    shape = shape_for_target(above, round(size))
    return dict(shape.to_dict()), meta_model(pruned_config(above.config, shape))


def stage_plans(plan: Any) -> list[Any]:
    """One :class:`Plan` per teacher -> student stage, in the order they run: each assistant from the model
    above it (on its own token budget), then the student from the last assistant (``plan`` itself when there
    is no assistant). Only the student's plan keeps the original teacher's name for the export."""
    stages = []
    teacher, teacher_params = plan.teacher, plan.teacher_params
    for assistant in plan.assistants:
        stages.append(
            dataclasses.replace(
                plan,
                teacher=teacher,
                teacher_params=teacher_params,
                teacher_kind=plan.teacher_kind if teacher == plan.teacher else "assistant",
                student_params=assistant.params,
                student_shape=assistant.shape,
                stage_tokens=assistant.tokens,
                student_init=None,
            )
        )
        teacher, teacher_params = assistant.name, assistant.params
    if not plan.assistants:
        return [plan]
    student = dataclasses.replace(plan, teacher=teacher, teacher_kind="assistant", teacher_params=teacher_params)
    return [*stages, student]
