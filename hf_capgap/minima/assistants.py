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
import math
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

    'none' gives none; 'auto' the law's chain (none when the teacher is within the law's reach), each size
    that no shape holds snapped to the nearest prunable one that keeps both its steps within the law; a list
    is refused unless every size lies strictly between the student and the teacher. Either way the chain must
    shrink: each assistant's achieved size strictly below the model above it, and the student's pruned shape
    strictly below the last assistant (else a step would keep every weight and distil a model into itself).
    """
    from hf_capgap.law import format_params
    from hf_capgap.utils.parameters import count_model_parameters

    word = config.assistants.strip().lower()
    if word == NO_ASSISTANTS:
        return ()
    teacher_params = count_model_parameters(teacher)
    auto = word == AUTO_ASSISTANTS
    if auto:
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
    above, above_params = teacher, teacher_params
    for number, size in enumerate(sizes, start=1):
        below = sizes[number] if number < len(sizes) else student_params
        try:
            shape, model = _pruned_skeleton(above, size)
        except ConfigError as err:
            snapped = _snap_within_law(law, above, above_params, size, below) if auto else None
            if snapped is None:
                raise ConfigError(
                    f"assistants={config.assistants!r}: assistant {number} ({format_params(size)}) cannot be pruned "
                    f"from the model above it: {err}"
                    + (" No prunable shape near it keeps both its steps within the law." if auto else "")
                    + " Choose other assistant sizes."
                ) from None
            shape, model = snapped
        params = count_model_parameters(model)
        if not student_params < params < above_params:
            raise ConfigError(
                f"assistants={config.assistants!r}: assistant {number} ({format_params(size)}) prunes to "
                f"{params:,} parameters, not strictly between the student ({student_params:,}) and the model above "
                f"it ({above_params:,}); each assistant must shrink the chain: choose other assistant sizes."
            )
        assistants.append(Assistant(f"assistant-{number}", float(size), params, shape, config.assistant_token_count))
        above, above_params = model, params
    if assistants:
        _check_student_below(config, above, above_params, student_params)
    return tuple(assistants)


def _check_student_below(config: MinimaConfig, last: Any, last_params: int, student_params: int) -> None:
    """Refuse a student whose pruned shape (cut from the last assistant) is not smaller than that assistant."""
    from hf_capgap.law import format_params
    from hf_capgap.pruning import PruneShape, shape_for_target
    from hf_capgap.pruning.layouts import shape_params, validate_shape

    try:
        if config.student_shape is not None:
            shape = validate_shape(last.config, PruneShape.from_value(config.student_shape))
        else:
            shape = shape_for_target(last, student_params)
    except ConfigError as err:
        raise ConfigError(
            f"assistants={config.assistants!r}: the student ({format_params(student_params)}) cannot be pruned from "
            f"the last assistant ({last_params:,} parameters): {err} Choose other assistant sizes."
        ) from None
    params = shape_params(last, shape)
    if not params < last_params:
        raise ConfigError(
            f"assistants={config.assistants!r}: the student prunes to {params:,} parameters from the last assistant "
            f"({last_params:,}), which is not smaller: that step would keep every weight. Choose a last assistant "
            "larger than the student, or assistants: none."
        )


def _pruned_skeleton(above: Any, size: float) -> tuple[dict[str, int], Any]:
    """The shape pruning picks for ``size`` from ``above``, and the meta-device model of that shape."""
    from hf_capgap.pruning import shape_for_target
    from hf_capgap.pruning.layouts import meta_model, pruned_config

    shape = shape_for_target(above, round(size))
    return dict(shape.to_dict()), meta_model(pruned_config(above.config, shape))


def _snap_within_law(
    law: Any, above: Any, above_params: int, size: float, below: float
) -> tuple[dict[str, int], Any] | None:
    """The prunable shape of ``above`` nearest ``size`` (in log size) whose two steps, from ``above`` and down to
    ``below``, stay within the law's upper bound (the bound :meth:`CapacityGapLaw.chain` plans with); None if
    none does. Heads move in whole KV groups with the hidden size, as in ``shape_for_target``; for each
    (heads, layers) the count is linear in the MLP width, so the nearest width is solved for."""
    from hf_capgap.pruning import PruneShape
    from hf_capgap.pruning.layouts import meta_model, param_counter, pruned_config

    def within(params: float) -> bool:
        return above_params <= _upper(law, params) * (1 + 1e-9) and params <= _upper(law, below) * (1 + 1e-9)

    count = param_counter(above)
    teacher = PruneShape.of(above.config)
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    per_head = teacher.hidden_size // teacher.num_attention_heads
    best: tuple[float, PruneShape] | None = None
    for heads in range(group, teacher.num_attention_heads + 1, group):
        for layers in range(1, teacher.num_hidden_layers + 1):
            base = PruneShape(
                hidden_size=heads * per_head,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads // group,
                intermediate_size=1,
            )
            fixed = count(base)
            per_neuron = count(dataclasses.replace(base, intermediate_size=2)) - fixed
            exact = 1 + (size - fixed) / per_neuron
            for neurons in {math.floor(exact), math.ceil(exact), 1, teacher.intermediate_size}:
                neurons = min(max(neurons, 1), teacher.intermediate_size)
                params = fixed + (neurons - 1) * per_neuron
                if not (below < params < above_params and within(params)):
                    continue
                distance = abs(math.log(params / size))
                if best is None or distance < best[0]:
                    best = (distance, dataclasses.replace(base, intermediate_size=neurons))
    if best is None:
        return None
    return dict(best[1].to_dict()), meta_model(pruned_config(above.config, best[1]))


def _upper(law: Any, student: float) -> float:
    """The largest teacher the law allows for ``student``: the upper end of its interval, or the point
    prediction where it has none or that lies above it (as :func:`hf_capgap.law.chain.plan_chain` bounds steps)."""
    try:
        prediction = law.predict(float(student))
    except ConfigError:
        return 0.0  # outside an affine law's range: no teacher is within its reach
    high = prediction.params if prediction.hi is None else max(prediction.params, prediction.hi)
    return float(high)


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
