"""Structured pruning of a teacher into a smaller student of the same standard architecture (MiniMA).

MiniMA-3B was cut from LLaMA-2-7B by keeping the most important attention heads, MLP neurons and
hidden dimensions (first-order Taylor scores on calibration text) and dropping whole layers, then
distilled. :func:`prune_model` does the same for LLaMA-family (Llama, Mistral, Qwen2; GQA included),
GPT-NeoX (Pythia) and GPT-2 models; the result is a plain ``*ForCausalLM`` with a resized config that
``AutoModelForCausalLM.from_pretrained`` loads without custom code.

* Width: one hidden-dimension selection is shared by the embeddings, every layer's residual
  reads/writes, every norm and the output head; each layer keeps its own best heads (whole KV groups)
  and neurons. Kept units stay in their original order.
* Depth: ``layer_selection="score"`` keeps the layers with the highest gate scores, ``"middle"``
  drops layers evenly from both ends (MiniMA dropped the first 4 and last 4 of 32), or pass the
  indices to keep.
* Norm weights are sliced with the hidden selection. RMSNorm / LayerNorm then normalise over fewer
  dimensions, so their statistics shift and the student is not exactly the teacher restricted to the
  kept units; MiniMA accepts this and lets distillation recover it. Likewise a GPT-2 teacher with
  ``scale_attn_by_inverse_layer_idx`` scales attention by the new layer index after layers are dropped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from hf_capgap.errors import ConfigError
from hf_capgap.pruning.importance import (
    ImportanceScores,
    magnitude_importance,
    taylor_importance,
)
from hf_capgap.pruning.layouts import (
    HEADS,
    HIDDEN,
    NEURONS,
    Axis,
    PruneShape,
    layer_index,
    layout_for,
    meta_model,
    mlp_width,
    param_counter,
    pruned_config,
    renumber_layer,
    shape_params,
    template_name,
    validate_shape,
)
from hf_capgap.utils.artifacts import (
    atomic_directory,
    json_sha256,
    model_fingerprint,
    write_manifest,
)
from hf_capgap.utils.parameters import count_model_parameters

__all__ = [
    "PruneSelection",
    "PruneShape",
    "PruningRecord",
    "apply_selection",
    "prune_model",
    "pruned_config",
    "save_pruned",
    "select_units",
    "shape_for_target",
    "shape_params",
]

MANIFEST_KIND = "pruned_student"
FORMAT_VERSION = 1
TARGET_TOLERANCE = 0.02
LAYER_SELECTIONS = ("score", "middle")


@dataclass(frozen=True)
class PruneSelection:
    """Which teacher units a student keeps. ``heads`` counts KV groups (plain heads without GQA)."""

    layers: list[int]
    hidden: Tensor
    heads: list[Tensor]  # one per kept layer, indices into that layer's KV groups
    neurons: list[Tensor]  # one per kept layer


@dataclass(frozen=True)
class PruningRecord:
    """What produced a student; :func:`save_pruned` writes it into the manifest."""

    teacher_fingerprint: str
    teacher_shape: dict[str, int | None]
    shape: dict[str, int | None]
    teacher_params: int
    student_params: int
    kept: dict[str, Any]
    importance: str = "given selection"
    layer_selection: str = "given selection"
    calibration_tokens: int = 0

    @property
    def kept_fraction(self) -> float:
        return self.student_params / self.teacher_params


def prune_model(
    model: PreTrainedModel,
    *,
    target_params: int | None = None,
    shape: PruneShape | Mapping[str, int] | None = None,
    calibration: Iterable[Mapping[str, Tensor]] | None = None,
    layer_selection: str | Sequence[int] = "score",
    checkpoint_layers: bool = False,
) -> PreTrainedModel:
    """Return a pruned copy of ``model`` with ``target_params`` parameters (within 2%) or ``shape``.

    ``calibration`` yields batches like ``{"input_ids": LongTensor[batch, seq]}`` for Taylor scores;
    without it, weight magnitude is used (with a warning). ``checkpoint_layers`` recomputes each
    layer's activations in the scoring backward pass instead of keeping them (a 7B teacher at 4096
    tokens). The teacher is left unchanged; the student carries a :class:`PruningRecord` as
    ``student.pruning_record``.
    """
    config = model.config
    layout_for(config)
    if (target_params is None) == (shape is None):
        raise ConfigError("pass exactly one of target_params (a parameter count) or shape (explicit sizes).")
    if isinstance(calibration, Sequence) and len(calibration) == 0:
        raise ConfigError(
            "calibration is empty; pass at least one {'input_ids': ...} batch, or None for magnitude scores."
        )
    explicit_layers = _explicit_layers(layer_selection, config.num_hidden_layers)
    if shape is not None:
        shape = validate_shape(config, PruneShape.from_value(shape))
    else:
        shape = shape_for_target(
            model, target_params, num_hidden_layers=len(explicit_layers) if explicit_layers else None
        )
    if explicit_layers is not None and len(explicit_layers) != shape.num_hidden_layers:
        raise ConfigError(
            f"layer_selection keeps {len(explicit_layers)} layers but shape.num_hidden_layers is "
            f"{shape.num_hidden_layers}; make them agree."
        )

    scores = (
        magnitude_importance(model)
        if calibration is None
        else taylor_importance(model, calibration, checkpoint_layers=checkpoint_layers)
    )
    selection = select_units(scores, shape, explicit_layers if explicit_layers is not None else layer_selection)
    student = apply_selection(model, selection)
    student.pruning_record = replace(
        student.pruning_record,
        importance=scores.method,
        layer_selection=layer_selection if isinstance(layer_selection, str) else "explicit",
        calibration_tokens=scores.calibration_tokens,
    )
    return student


def shape_for_target(
    model: torch.nn.Module, target_params: int, *, num_hidden_layers: int | None = None
) -> PruneShape:
    """The most teacher-like shape whose parameter count is within 2% of ``target_params``.

    Rule: heads move in whole KV groups and the hidden size follows them (``hidden = heads x
    teacher hidden / teacher heads``), which also keeps the head size; every (heads, layers) pair is
    tried, and for each the MLP width that lands on the target is solved for (rounded to a multiple
    of 8, or to 1 where 8 misses the tolerance). Among shapes within tolerance, the one whose width,
    depth and MLP ratios to the teacher are closest to each other wins (MiniMA-3B scales all three by
    ~0.75), ties going to the closest count. ``model`` may live on the meta device.
    """
    config = model.config
    teacher = PruneShape.of(config)
    count = param_counter(model)
    teacher_params = count(teacher)
    if not isinstance(target_params, int) or isinstance(target_params, bool) or target_params < 1:
        raise ConfigError(f"target_params must be a positive integer, got {target_params!r}.")
    if target_params > teacher_params:
        raise ConfigError(
            f"target_params={target_params:,} is larger than the teacher ({teacher_params:,} parameters); "
            "pruning only shrinks a model."
        )
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    per_head = teacher.hidden_size // teacher.num_attention_heads
    best: tuple[float, float, PruneShape] | None = None
    for base, fixed, per_neuron in shape_families(model, num_hidden_layers=num_hidden_layers, count=count):
        exact = 1 + (target_params - fixed) / per_neuron
        for neurons in (8 * round(exact / 8), round(exact)):
            if not 1 <= neurons <= teacher.intermediate_size:
                continue
            candidate = replace(base, intermediate_size=neurons)
            error = abs(fixed + (neurons - 1) * per_neuron - target_params) / target_params
            if error > TARGET_TOLERANCE:
                continue
            width = math.log(base.num_attention_heads / teacher.num_attention_heads)
            depth = math.log(base.num_hidden_layers / teacher.num_hidden_layers)
            mlp = math.log(neurons / teacher.intermediate_size)
            key = (abs(width - depth) + abs(mlp - width), error)
            if best is None or key < best[:2]:
                best = (*key, candidate)
            break
    if best is None:
        smallest = PruneShape(
            hidden_size=group * per_head, num_hidden_layers=1, num_attention_heads=group, intermediate_size=1
        )
        raise ConfigError(
            f"no shape of this {config.model_type} teacher has target_params={target_params:,} parameters "
            f"within {TARGET_TOLERANCE:.0%} (the smallest has {shape_params(model, smallest):,}); choose "
            "another target_params or pass an explicit shape."
        )
    return validate_shape(config, best[2])


def shape_families(
    model: torch.nn.Module,
    *,
    num_hidden_layers: int | None = None,
    count: Callable[[PruneShape], int] | None = None,
) -> Iterator[tuple[PruneShape, int, int]]:
    """Every (heads, layers) a shape cut from ``model`` can have (heads in whole KV groups, the hidden size
    following them, so the head size is kept; ``num_hidden_layers`` fixes the depth), as that shape with a
    one-neuron MLP, its parameter count and the count each further MLP neuron adds (a count is linear in the
    MLP width): what :func:`shape_for_target` solves over. ``model`` may live on the meta device."""
    teacher = PruneShape.of(model.config)
    count = count or param_counter(model)
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    per_head = teacher.hidden_size // teacher.num_attention_heads
    depths = [num_hidden_layers] if num_hidden_layers else range(1, teacher.num_hidden_layers + 1)
    for heads in range(group, teacher.num_attention_heads + 1, group):
        for layers in depths:
            base = PruneShape(
                hidden_size=heads * per_head,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads // group,
                intermediate_size=1,
            )
            fixed = count(base)
            yield base, fixed, count(replace(base, intermediate_size=2)) - fixed


def select_units(scores: ImportanceScores, shape: PruneShape, layer_selection: str | Sequence[int]) -> PruneSelection:
    """Keep the top-scoring units for ``shape``, each set in its original order."""
    num_layers = scores.layers.numel()
    if isinstance(layer_selection, str):
        if layer_selection == "score":
            layers = _top(scores.layers, shape.num_hidden_layers).tolist()
        else:
            front = (num_layers - shape.num_hidden_layers) // 2
            layers = list(range(front, front + shape.num_hidden_layers))
    else:
        layers = list(layer_selection)
    return PruneSelection(
        layers=layers,
        hidden=_top(scores.hidden, shape.hidden_size),
        heads=[_top(scores.heads[i], shape.num_key_value_heads) for i in layers],
        neurons=[_top(scores.neurons[i], shape.intermediate_size) for i in layers],
    )


def apply_selection(model: PreTrainedModel, selection: PruneSelection) -> PreTrainedModel:
    """Build the student that keeps exactly ``selection`` of ``model``'s units (in the given order).

    The student generates like the teacher: it gets a copy of the teacher's ``generation_config``
    (a config-built model would fall back to defaults and lose, e.g., a chat model's end-of-turn ids).
    """
    config = model.config
    layout = layout_for(config)
    shape = _check_selection(config, selection)
    student_config = pruned_config(config, shape, kept_layers=selection.layers)
    parameter = next(model.parameters())
    student_config.dtype = parameter.dtype
    new_index = {old: new for new, old in enumerate(selection.layers)}
    axes = layout.weight_axes(config)

    sliced: dict[str, Tensor] = {}
    by_storage: dict[tuple[int, tuple[int, ...]], Tensor] = {}
    for name, tensor in model.state_dict().items():
        old = layer_index(name)
        if old is not None and old not in new_index:
            continue
        spec = axes.get(template_name(name))
        if spec is None:
            raise ConfigError(
                f"weight {name!r} is not part of the standard {config.model_type} layout; cannot prune it."
            )
        key = (tensor.data_ptr(), tuple(tensor.shape))  # tied weights are sliced once and stay shared
        if key not in by_storage:
            units = {HIDDEN: selection.hidden}
            if old is not None:
                units |= {HEADS: selection.heads[new_index[old]], NEURONS: selection.neurons[new_index[old]]}
            by_storage[key] = _keep_units(tensor, spec, units)
        new_name = name if old is None else renumber_layer(name, new_index[old])
        sliced[new_name] = by_storage[key]

    student = meta_model(student_config)
    student.load_state_dict(sliced, strict=True, assign=True)
    teacher_buffers = dict(model.named_buffers())
    for name, buffer in list(student.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            student.get_submodule(module_name)._buffers[buffer_name] = teacher_buffers[name].clone()
    student.tie_weights()
    if getattr(model, "generation_config", None) is not None:  # end-of-turn ids, sampling defaults
        student.generation_config = copy.deepcopy(model.generation_config)
    student.train(model.training)
    student.pruning_record = PruningRecord(
        teacher_fingerprint=model_fingerprint(model),
        teacher_shape=PruneShape.of(config).to_dict(),
        shape=shape.to_dict(),
        teacher_params=count_model_parameters(model),
        student_params=count_model_parameters(student),
        kept=_kept_summary(config, selection),
    )
    return student


def save_pruned(
    model: PreTrainedModel, out_dir: str | Path, *, teacher_name: str, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write a pruned student (safetensors, config, tokenizer, manifest) so it appears only when complete."""
    record = getattr(model, "pruning_record", None)
    if not isinstance(record, PruningRecord):
        raise TypeError("model has no pruning_record: save_pruned takes a student returned by prune_model.")
    if not teacher_name:
        raise ConfigError("teacher_name is empty; pass the teacher's Hub id or local path.")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fields = {"teacher_name": teacher_name, **asdict(record), "kept_fraction": record.kept_fraction}
        write_manifest(tmp, MANIFEST_KIND, FORMAT_VERSION, fields)
    return out_dir


def _keep_units(tensor: Tensor, spec: Mapping[int, Axis], units: Mapping[str, Tensor]) -> Tensor:
    """Copy of ``tensor`` with only the rows/columns of the kept units, in the order given."""
    for dim, axis in spec.items():
        tensor = tensor.index_select(dim, axis.entries(units[axis.unit].to(tensor.device), tensor.shape[dim]))
    return tensor


def _top(scores: Tensor, k: int) -> Tensor:
    return torch.topk(scores.float(), k).indices.sort().values


def _explicit_layers(layer_selection: str | Sequence[int], num_layers: int) -> list[int] | None:
    if isinstance(layer_selection, str):
        if layer_selection not in LAYER_SELECTIONS:
            raise ConfigError(
                f"layer_selection={layer_selection!r} is not one of {LAYER_SELECTIONS} or a list of layer indices."
            )
        return None
    layers = list(layer_selection)
    if not layers or any(not isinstance(i, int) or not 0 <= i < num_layers for i in layers):
        raise ConfigError(f"layer_selection must list layer indices in [0, {num_layers}), got {layers}.")
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ConfigError(f"layer_selection must list distinct layer indices in increasing order, got {layers}.")
    return layers


def _check_selection(config: PretrainedConfig, selection: PruneSelection) -> PruneShape:
    teacher = PruneShape.of(config)
    _explicit_layers(selection.layers, teacher.num_hidden_layers)
    if len(selection.heads) != len(selection.layers) or len(selection.neurons) != len(selection.layers):
        raise ConfigError("selection.heads and selection.neurons need one entry per kept layer.")
    for name, groups, limit in (
        ("hidden", [selection.hidden], teacher.hidden_size),
        ("heads", selection.heads, teacher.num_key_value_heads),
        ("neurons", selection.neurons, teacher.intermediate_size),
    ):
        sizes = {len(g) for g in groups}
        if len(sizes) != 1:
            raise ConfigError(
                f"selection.{name} keeps different counts per layer {sorted(sizes)}; keep the same number."
            )
        for g in groups:
            if len(g) == 0 or len(set(g.tolist())) != len(g) or int(g.min()) < 0 or int(g.max()) >= limit:
                raise ConfigError(f"selection.{name} must hold distinct indices in [0, {limit}).")
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    return validate_shape(
        config,
        PruneShape(
            hidden_size=len(selection.hidden),
            num_hidden_layers=len(selection.layers),
            num_attention_heads=len(selection.heads[0]) * group,
            intermediate_size=len(selection.neurons[0]),
        ),
    )


def _kept_summary(config: PretrainedConfig, selection: PruneSelection) -> dict[str, Any]:
    return {
        "layers": selection.layers,
        "heads": [g.tolist() for g in selection.heads],
        "hidden": {
            "kept": len(selection.hidden),
            "of": config.hidden_size,
            "sha256": json_sha256(selection.hidden.tolist()),
        },
        "neurons": {
            "kept_per_layer": len(selection.neurons[0]),
            "of": mlp_width(config),
            "sha256": json_sha256([n.tolist() for n in selection.neurons]),
        },
    }
