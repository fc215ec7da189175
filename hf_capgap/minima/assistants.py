"""Teacher assistants (TAKD) in the MiniMA recipe: the chain teacher -> assistants -> student, planned.

``assistants: auto`` asks the recipe's law for the sizes (:meth:`CapacityGapLaw.chain`); a list names them.
Each planned size is an exact float; the run prunes each assistant from the model above it. A listed size
gets the shape :func:`hf_capgap.pruning.shape_for_target` picks from that model's config (within pruning's
2% of it); an 'auto' one gets that shape where the chain below it can be built from it, else a prunable
shape near it from which it can (every step within the law's bound, down to the student's pruned shape).
Its parameter count is what its shape holds. All of it on the meta device.

Every stage of the chain is an ordinary teacher -> student stage of the recipe: :func:`stage_plans`
gives each one a :class:`Plan` whose teacher is the model above it, so the prune and distill stages run
unchanged on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_capgap.errors import ConfigError
from hf_capgap.minima.config import AUTO_ASSISTANTS, NO_ASSISTANTS, MinimaConfig

if TYPE_CHECKING:
    from hf_capgap.pruning.layouts import PruneShape


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

    'none' gives none; 'auto' the law's chain (none when the teacher is within the law's reach), each assistant
    a prunable shape near its planned size chosen so that the whole chain can be built (see :func:`_auto_chain`);
    a list is refused unless every size lies strictly between the student and the teacher. Either way the chain
    must shrink: each assistant's achieved size strictly below the model above it, and the student's pruned shape
    strictly below the last assistant (else a step would keep every weight and distil a model into itself).
    """
    from hf_capgap.law import format_params
    from hf_capgap.utils.parameters import count_model_parameters

    word = config.assistants.strip().lower()
    if word == NO_ASSISTANTS:
        return ()
    teacher_params = count_model_parameters(teacher)
    if word == AUTO_ASSISTANTS:
        plan = law.chain(student_params, teacher_params)
        if not plan.assistants:
            return ()
        chain = _auto_chain(config, law, teacher, student_params, plan.assistants)
        if chain is None:
            raise ConfigError(_no_chain_message(config, law, teacher, student_params, plan.bound))
        tokens = config.assistant_token_count
        return tuple(
            Assistant(f"assistant-{number}", float(size), params, shape.to_dict(), tokens)
            for number, (size, (shape, _, params)) in enumerate(zip(plan.assistants, chain, strict=True), start=1)
        )
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
        try:
            shape, model = _pruned_skeleton(above, size)
        except ConfigError as err:
            raise ConfigError(
                f"assistants={config.assistants!r}: assistant {number} ({format_params(size)}) cannot be pruned "
                f"from the model above it: {err} Choose other assistant sizes."
            ) from None
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


CANDIDATES_PER_ASSISTANT = 8
"""How many prunable shapes 'auto' tries for each assistant (the nearest its planned size) before giving up."""

_TOLERANCE = 1e-9
"""Relative slack so that a step equal to the law's bound up to rounding counts as within it (as in the law)."""

_Link = tuple["PruneShape", Any, int]  # an assistant's shape, its meta-device model and its parameter count
_Holds = Callable[["PruneShape"], bool]


def _auto_chain(
    config: MinimaConfig, law: Any, teacher: Any, student_params: int, sizes: Sequence[float]
) -> list[_Link] | None:
    """One prunable assistant per planned size, such that every step (the student's included, at the size its
    pruned shape holds) is within the law's bound and the sizes strictly decrease; None if none is found.

    Depth first over the chain: for each assistant, the shape pruning picks for its planned size first, then the
    other prunable shapes of the model above it nearest that size in log size, at most
    :data:`CANDIDATES_PER_ASSISTANT` of those that could hold the student (:func:`_candidates`); a shape from which
    pruning cannot cut the student is skipped, since no assistant cut from it could give the student either. A
    shape is judged once per position in the chain (its model and its subchain depend on it alone: every shape is
    cut from the teacher's config, a cut of a cut counting as the same cut from the teacher), which bounds the
    search by the number of distinct shapes.
    """
    from hf_capgap.pruning.layouts import meta_model, pruned_config

    holds = _student_holder(config, teacher, student_params)
    models: dict[PruneShape, Any] = {}
    students: dict[PruneShape, int | None] = {}
    failed: set[tuple[PruneShape, int]] = set()

    def model_of(shape: PruneShape) -> Any:
        if shape not in models:
            models[shape] = meta_model(pruned_config(teacher.config, shape))
        return models[shape]

    def search(above: Any, above_params: int, level: int) -> list[_Link] | None:
        last = level == len(sizes) - 1
        steps = len(sizes) - level
        for shape, params in _candidates(law, above, above_params, sizes[level], student_params, steps, holds):
            if (shape, level) in failed:
                continue
            model = model_of(shape)
            if shape not in students:
                students[shape] = _student_size(config, model, student_params)
            student = students[shape]
            if student is not None and last:
                if student < params <= _upper(law, student) * (1 + _TOLERANCE):
                    return [(shape, model, params)]
            elif student is not None:
                rest = search(model, params, level + 1)
                if rest is not None:
                    return [(shape, model, params), *rest]
            failed.add((shape, level))
        return None

    from hf_capgap.utils.parameters import count_model_parameters

    return search(teacher, count_model_parameters(teacher), 0)


def _student_size(config: MinimaConfig, model: Any, student_params: int) -> int | None:
    """What the student pruned from ``model`` holds (the shape asked for, or the one pruning picks), or None
    when ``model`` cannot hold it."""
    from hf_capgap.pruning import shape_for_target
    from hf_capgap.pruning.layouts import PruneShape, shape_params, validate_shape

    try:
        if config.student_shape is not None:
            shape = validate_shape(model.config, PruneShape.from_value(config.student_shape))
        else:
            shape = shape_for_target(model, student_params)
    except ConfigError:
        return None
    return shape_params(model, shape)


def _candidates(
    law: Any, above: Any, above_params: int, size: float, student_params: int, steps: int, holds: _Holds
) -> list[tuple[PruneShape, int]]:
    """Shapes of ``above`` for an assistant planned at ``size`` with ``steps`` steps left down to the student:
    each below ``above`` and above the student, ``above`` within the law's reach of it, and it within ``steps``
    reaches of a student up to pruning's tolerance above ``student_params``. Heads move in whole KV groups with the
    hidden size, as in ``shape_for_target``; for each (heads, layers) the count is linear in the MLP width, so the
    widths nearest ``size`` are solved for, with the narrowest and widest the bounds allow (the widest meeting the
    reach of a student at the tolerance's low end, so that the step down to it can hold whatever it prunes to).
    Only shapes that ``holds`` (could hold the student) count. The shape pruning picks for ``size`` comes first,
    then the rest by log distance to ``size``."""
    from hf_capgap.pruning import TARGET_TOLERANCE, shape_for_target
    from hf_capgap.pruning.layouts import PruneShape, param_counter
    from hf_capgap.pruning.prune import shape_families

    def reach(student: float) -> float:
        for _ in range(steps):
            student = _upper(law, student)
        return student

    def fits(params: float) -> bool:
        return (
            student_params < params < above_params
            and above_params <= _upper(law, params) * (1 + _TOLERANCE)
            and params <= reach(student_params * (1 + TARGET_TOLERANCE)) * (1 + _TOLERANCE)
        )

    high = min(above_params - 1, reach(student_params * (1 - TARGET_TOLERANCE)))
    low = _lowest_within_reach(law, above_params, student_params)
    found: dict[PruneShape, int] = {}
    most = PruneShape.of(above.config).intermediate_size
    for base, fixed, per_neuron in shape_families(above):
        exact, narrowest, widest = (1 + (params - fixed) / per_neuron for params in (size, low, high))
        for neurons in {math.floor(exact), math.ceil(exact), math.ceil(narrowest), math.floor(widest)}:
            shape = dataclasses.replace(base, intermediate_size=min(max(neurons, 1), most))
            params = fixed + (shape.intermediate_size - 1) * per_neuron
            if fits(params) and holds(shape):
                found[shape] = params
    try:
        picked = shape_for_target(above, round(size))
    except ConfigError:
        picked = None
    if picked is not None and fits(params := param_counter(above)(picked)) and holds(picked):
        found[picked] = params
    ranked = sorted(
        found,
        key=lambda shape: (shape != picked, abs(math.log(found[shape] / size)), dataclasses.astuple(shape)),
    )
    return [(shape, found[shape]) for shape in ranked[:CANDIDATES_PER_ASSISTANT]]


def _student_holder(config: MinimaConfig, teacher: Any, student_params: int) -> _Holds:
    """Whether a shape contains one the student could be pruned to (its explicit shape, or for some (heads,
    layers) the narrowest MLP within pruning's tolerance of ``student_params``): a model that does not cannot
    give the student, nor can any assistant cut from it."""
    from hf_capgap.pruning import TARGET_TOLERANCE
    from hf_capgap.pruning.layouts import PruneShape, validate_shape
    from hf_capgap.pruning.prune import shape_families

    if config.student_shape is not None:
        try:
            smallest = [validate_shape(teacher.config, PruneShape.from_value(config.student_shape))]
        except ConfigError:
            smallest = []
    else:
        smallest = []
        most = PruneShape.of(teacher.config).intermediate_size
        for base, fixed, per_neuron in shape_families(teacher):
            neurons = max(1, math.ceil(1 + (student_params * (1 - TARGET_TOLERANCE) - fixed) / per_neuron))
            if neurons <= most and fixed + (neurons - 1) * per_neuron <= student_params * (1 + TARGET_TOLERANCE):
                smallest.append(dataclasses.replace(base, intermediate_size=neurons))

    def holds(shape: PruneShape) -> bool:
        return any(
            low.num_attention_heads <= shape.num_attention_heads
            and low.num_hidden_layers <= shape.num_hidden_layers
            and low.intermediate_size <= shape.intermediate_size
            for low in smallest
        )

    return holds


def _lowest_within_reach(law: Any, above_params: int, student_params: int) -> float:
    """The smallest size (down to the student) from which ``above_params`` is within the law's reach, by
    bisection (the law's bound grows with the student's size, as :func:`hf_capgap.law.chain.plan_chain` assumes)."""
    low, high = float(student_params), float(above_params)
    if above_params <= _upper(law, low) * (1 + _TOLERANCE):
        return low
    for _ in range(60):
        middle = (low + high) / 2
        if above_params <= _upper(law, middle) * (1 + _TOLERANCE):
            high = middle
        else:
            low = middle
    return high


def _no_chain_message(config: MinimaConfig, law: Any, teacher: Any, student_params: int, bound: str) -> str:
    """Why 'auto' found no chain, in its own terms, with the nearest student sizes for which it does."""
    from hf_capgap.law import format_params
    from hf_capgap.utils.parameters import count_model_parameters

    teacher_params = count_model_parameters(teacher)
    nearby = []
    for factor in NEARBY_STUDENTS:
        size = round(student_params * factor)
        if size < teacher_params and _plans(config, law, teacher, size):
            nearby.append(format_params(size))
    suggestion = f"a nearby student size ({', '.join(nearby)})" if nearby else "another student size"
    return (
        f"assistants={config.assistants!r}: no chain of prunable assistants from the {format_params(teacher_params)} "
        f"teacher to the {format_params(student_params)} student keeps every step within the law's bound "
        f"({bound}); try {suggestion}, an explicit list (assistants: 300K,150K), or assistants: none."
    )


NEARBY_STUDENTS = (0.95, 1.05, 0.9, 1.1, 0.8, 1.2)
"""The student sizes (relative to the refused one) a refusal of 'auto' tries, to name those that plan."""


def _plans(config: MinimaConfig, law: Any, teacher: Any, student_params: int) -> bool:
    """Whether 'auto' plans a chain of at least one assistant for a student of ``student_params``."""
    from hf_capgap.utils.parameters import count_model_parameters

    try:
        sizes = law.chain(student_params, count_model_parameters(teacher)).assistants
    except ConfigError:
        return False
    return bool(sizes) and _auto_chain(config, law, teacher, student_params, sizes) is not None


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
