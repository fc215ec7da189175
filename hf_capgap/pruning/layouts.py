"""Where each supported architecture keeps its prunable units, and what a pruned shape looks like.

A *unit* is what pruning keeps or drops whole: a hidden dimension (one index shared by the residual
stream of every layer, the embeddings, the norms and the output head), an attention unit (a KV head
together with the query heads that read it; a plain head without GQA) or an MLP neuron. Every weight
lists, per axis, the unit that axis indexes and how many consecutive rows or columns one unit spans.
Slicing, weight-magnitude scores and parameter counts all read that one table, so they cannot drift
apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig

from hf_capgap.errors import ConfigError

HIDDEN = "hidden"
HEADS = "heads"
NEURONS = "neurons"

_LAYER_INDEX = re.compile(r"\.(layers|h)\.(\d+)\.")  # GPT-2 names its layers transformer.h.<i>


@dataclass(frozen=True, kw_only=True)
class PruneShape:
    """The size of a pruned student, in the teacher's own config terms.

    ``num_key_value_heads=None`` keeps the teacher's query-heads-per-KV-head ratio (KV groups are kept
    or dropped whole, so that ratio cannot change).
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    intermediate_size: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> PruneShape:
        return cls(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=_kv_heads(config),
            intermediate_size=mlp_width(config),
        )

    @classmethod
    def from_value(cls, value: PruneShape | Mapping[str, Any]) -> PruneShape:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"shape must be a PruneShape or a dict, got {type(value).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"shape has unknown keys {unknown}; allowed keys are {sorted(known)}.")
        missing = sorted(f.name for f in fields(cls) if f.name not in value and f.name != "num_key_value_heads")
        if missing:
            raise ConfigError(f"shape is missing {missing}; give every size of the student.")
        return cls(**value)

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


@dataclass(frozen=True)
class Axis:
    """One axis of a weight that indexes ``unit``, ``span`` consecutive entries per unit.

    ``blocks > 1`` means the axis is that many equal blocks laid end to end, each indexing every unit
    (GPT-2's fused ``q | k | v`` projection); a kept unit keeps its entries in every block.
    """

    unit: str
    span: int = 1
    blocks: int = 1

    def entries(self, kept: Tensor, length: int) -> Tensor:
        """Indices along an axis of ``length`` entries that belong to the ``kept`` units, in their order."""
        units = length // (self.blocks * self.span)
        block = torch.arange(self.blocks, device=kept.device)[:, None, None] * units
        rows = (block + kept[None, :, None]) * self.span + torch.arange(self.span, device=kept.device)
        return rows.reshape(-1)

    def per_unit(self, per_entry: Tensor) -> Tensor:
        """Per-entry values summed over each unit's span in every block."""
        return per_entry.unflatten(0, (self.blocks, -1, self.span)).sum(dim=(0, 2))


WeightAxes = dict[str, dict[int, Axis]]


@dataclass(frozen=True)
class Layout:
    """The module paths, weight axes and config keys of one architecture family.

    ``axes(config, layer)`` gives the axes of every weight except ``lm_head``, with layer weights
    named by the prefix ``layer`` (the layer index written as ``*``). ``config_keys`` names the config
    entry that holds each :class:`PruneShape` size.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    embeddings: tuple[str, ...]  # modules whose outputs sum into the residual stream at the input
    attention_output: str
    mlp_output: str
    config_keys: tuple[tuple[str, str], ...]
    axes: Callable[[PretrainedConfig, str], WeightAxes]

    def weight_axes(self, config: PretrainedConfig) -> WeightAxes:
        """Axes of every weight, keyed by name with the layer index written as ``*``."""
        return {"lm_head.weight": {1: Axis(HIDDEN)}} | self.axes(config, f"{self.layers}.*.")


def _query(config: PretrainedConfig) -> Axis:
    """Attention outputs (query heads) read by the output projection, one KV group per unit."""
    return Axis(HEADS, head_dim(config) * config.num_attention_heads // _kv_heads(config))


def _llama_axes(config: PretrainedConfig, layer: str) -> WeightAxes:
    hidden, neuron, query = Axis(HIDDEN), Axis(NEURONS), _query(config)
    key_value = Axis(HEADS, head_dim(config))
    axes: WeightAxes = {"model.embed_tokens.weight": {1: hidden}, "model.norm.weight": {0: hidden}}
    for proj, span in (("q_proj", query), ("k_proj", key_value), ("v_proj", key_value)):
        axes[f"{layer}self_attn.{proj}.weight"] = {0: span, 1: hidden}
        axes[f"{layer}self_attn.{proj}.bias"] = {0: span}
    axes[f"{layer}self_attn.o_proj.weight"] = {0: hidden, 1: query}
    axes[f"{layer}self_attn.o_proj.bias"] = {0: hidden}
    for proj in ("gate_proj", "up_proj"):
        axes[f"{layer}mlp.{proj}.weight"] = {0: neuron, 1: hidden}
        axes[f"{layer}mlp.{proj}.bias"] = {0: neuron}
    axes[f"{layer}mlp.down_proj.weight"] = {0: hidden, 1: neuron}
    axes[f"{layer}mlp.down_proj.bias"] = {0: hidden}
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        axes[f"{layer}{norm}"] = {0: hidden}
    return axes


def _gpt_neox_axes(config: PretrainedConfig, layer: str) -> WeightAxes:
    hidden, neuron = Axis(HIDDEN), Axis(NEURONS)
    fused = Axis(HEADS, 3 * head_dim(config))  # laid out head by head: [q_h, k_h, v_h] for each head h
    axes: WeightAxes = {
        "gpt_neox.embed_in.weight": {1: hidden},
        "gpt_neox.final_layer_norm.weight": {0: hidden},
        "gpt_neox.final_layer_norm.bias": {0: hidden},
        f"{layer}attention.query_key_value.weight": {0: fused, 1: hidden},
        f"{layer}attention.query_key_value.bias": {0: fused},
        f"{layer}attention.dense.weight": {0: hidden, 1: _query(config)},
        f"{layer}attention.dense.bias": {0: hidden},
        f"{layer}mlp.dense_h_to_4h.weight": {0: neuron, 1: hidden},
        f"{layer}mlp.dense_h_to_4h.bias": {0: neuron},
        f"{layer}mlp.dense_4h_to_h.weight": {0: hidden, 1: neuron},
        f"{layer}mlp.dense_4h_to_h.bias": {0: hidden},
    }
    for norm in ("input_layernorm", "post_attention_layernorm"):
        axes[f"{layer}{norm}.weight"] = axes[f"{layer}{norm}.bias"] = {0: hidden}
    return axes


def _gpt2_axes(config: PretrainedConfig, layer: str) -> WeightAxes:
    """GPT-2's Conv1D layers store weights as [in, out], transposed against ``nn.Linear``."""
    hidden, neuron = Axis(HIDDEN), Axis(NEURONS)
    fused = Axis(HEADS, head_dim(config), blocks=3)  # [q | k | v], heads contiguous inside each block
    axes: WeightAxes = {
        "transformer.wte.weight": {1: hidden},
        "transformer.wpe.weight": {1: hidden},
        f"{layer}attn.c_attn.weight": {0: hidden, 1: fused},
        f"{layer}attn.c_attn.bias": {0: fused},
        f"{layer}attn.c_proj.weight": {0: _query(config), 1: hidden},
        f"{layer}attn.c_proj.bias": {0: hidden},
        f"{layer}mlp.c_fc.weight": {0: hidden, 1: neuron},
        f"{layer}mlp.c_fc.bias": {0: neuron},
        f"{layer}mlp.c_proj.weight": {0: neuron, 1: hidden},
        f"{layer}mlp.c_proj.bias": {0: hidden},
    }
    for norm in ("transformer.ln_f", f"{layer}ln_1", f"{layer}ln_2"):
        axes[f"{norm}.weight"] = axes[f"{norm}.bias"] = {0: hidden}
    return axes


_STANDARD_KEYS = tuple(
    (size, size) for size in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
)
LAYOUTS = (
    Layout(
        "llama",
        ("llama", "mistral", "qwen2"),
        "model.layers",
        ("model.embed_tokens",),
        "self_attn.o_proj",
        "mlp.down_proj",
        (*_STANDARD_KEYS, ("num_key_value_heads", "num_key_value_heads")),
        _llama_axes,
    ),
    Layout(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        ("gpt_neox.embed_in",),
        "attention.dense",
        "mlp.dense_4h_to_h",
        _STANDARD_KEYS,
        _gpt_neox_axes,
    ),
    Layout(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        ("transformer.wte", "transformer.wpe"),
        "attn.c_proj",
        "mlp.c_proj",
        (
            ("hidden_size", "n_embd"),
            ("num_hidden_layers", "n_layer"),
            ("num_attention_heads", "n_head"),
            ("intermediate_size", "n_inner"),
        ),
        _gpt2_axes,
    ),
)
SUPPORTED_MODEL_TYPES = tuple(t for layout in LAYOUTS for t in layout.model_types)


def layout_for(config: PretrainedConfig) -> Layout:
    for layout in LAYOUTS:
        if config.model_type in layout.model_types:
            return layout
    raise ConfigError(
        f"model_type {config.model_type!r} is not supported for pruning; supported model types are "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        "GPTNeoXForCausalLM, GPT2LMHeadModel)."
    )


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def mlp_width(config: PretrainedConfig) -> int:
    """The MLP width; GPT-2 keeps it in ``n_inner``, where None means 4 x hidden."""
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


def layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(2)) if match else None


def template_name(name: str) -> str:
    return _LAYER_INDEX.sub(r".\1.*.", name, count=1)


def renumber_layer(name: str, index: int) -> str:
    """``name`` of a layer weight moved to layer ``index`` (a student's layers are renumbered 0..n-1)."""
    return _LAYER_INDEX.sub(rf".\g<1>.{index}.", name, count=1)


def unit_counts(shape: PruneShape) -> dict[str, int]:
    return {HIDDEN: shape.hidden_size, HEADS: shape.num_key_value_heads, NEURONS: shape.intermediate_size}


def validate_shape(config: PretrainedConfig, shape: PruneShape) -> PruneShape:
    """Check ``shape`` against the teacher and fill in ``num_key_value_heads``; raise before any work."""
    layout_for(config)
    if getattr(config, "add_cross_attention", False):
        raise ConfigError(
            "config.add_cross_attention=True adds encoder cross-attention weights that pruning does not "
            "know; prune a decoder-only causal LM."
        )
    teacher = PruneShape.of(config)
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    for field in fields(PruneShape):
        value = getattr(shape, field.name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"shape.{field.name} must be a positive integer, got {value!r}.")
        if value > getattr(teacher, field.name):
            raise ConfigError(
                f"shape.{field.name}={value} exceeds the teacher's {getattr(teacher, field.name)}; pruning "
                "only removes structure, so ask for at most the teacher's size."
            )
    if shape.hidden_size % shape.num_attention_heads:
        raise ConfigError(
            f"shape.num_attention_heads={shape.num_attention_heads} does not divide "
            f"shape.hidden_size={shape.hidden_size}; choose a hidden size that is a multiple of the heads."
        )
    kv_heads = shape.num_key_value_heads or shape.num_attention_heads // group
    if shape.num_attention_heads % kv_heads or shape.num_attention_heads // kv_heads != group:
        raise ConfigError(
            f"shape.num_attention_heads={shape.num_attention_heads} must be {group} x "
            f"shape.num_key_value_heads (the teacher's query heads per KV head, since KV groups are kept "
            f"whole); use a multiple of {group} heads and leave num_key_value_heads unset."
        )
    if getattr(config, "head_dim", None) is None and shape.hidden_size != shape.num_attention_heads * head_dim(config):
        raise ConfigError(
            f"{config.model_type} derives the head size from hidden_size / num_attention_heads, so "
            f"shape.hidden_size must be num_attention_heads x {head_dim(config)} = "
            f"{shape.num_attention_heads * head_dim(config)}, got {shape.hidden_size}."
        )
    return PruneShape(**{**shape.to_dict(), "num_key_value_heads": kv_heads})


def pruned_config(
    config: PretrainedConfig, shape: PruneShape, kept_layers: list[int] | None = None
) -> PretrainedConfig:
    """The teacher's config resized to ``shape``: rope, norms, tying, dtype, head size and every other
    setting carry over."""
    shape = validate_shape(config, shape)
    kept_layers = list(range(shape.num_hidden_layers)) if kept_layers is None else kept_layers
    values = config.to_dict()
    values |= {key: getattr(shape, size) for size, key in layout_for(config).config_keys}
    if "head_dim" in values:
        values["head_dim"] = head_dim(config)
    if isinstance(values.get("layer_types"), list):
        values["layer_types"] = [config.layer_types[i] for i in kept_layers]
    if isinstance(values.get("max_window_layers"), int):
        values["max_window_layers"] = sum(i < config.max_window_layers for i in kept_layers)
    return type(config).from_dict(values)


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model ``config`` describes, with shapes but no storage (a 7B model costs nothing)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shape_params(teacher: torch.nn.Module, shape: PruneShape) -> int:
    """Parameters of the student ``shape`` cut from ``teacher`` (which may live on the meta device)."""
    return param_counter(teacher)(validate_shape(teacher.config, shape))


def param_counter(teacher: torch.nn.Module) -> Callable[[PruneShape], int]:
    """A fast parameter count for shapes cut from ``teacher`` (shapes with their KV heads filled in).

    Each weight's size scales with the unit counts of its pruned axes; layer weights count once per
    kept layer.
    """
    config = teacher.config
    axes = layout_for(config).weight_axes(config)
    have = unit_counts(PruneShape.of(config))
    weights = []  # (numel, pruned units, is a layer weight)
    for name, param in teacher.named_parameters():
        index = layer_index(name)
        if index in (None, 0):
            units = tuple(axis.unit for axis in axes.get(template_name(name), {}).values())
            weights.append((param.numel(), units, index == 0))

    def count(shape: PruneShape) -> int:
        want = unit_counts(shape)
        total = 0
        for numel, units, per_layer in weights:
            for unit in units:
                numel = numel // have[unit] * want[unit]
            total += numel * (shape.num_hidden_layers if per_layer else 1)
        return total

    return count
