"""Families of LLaMA models by parameter count: the teachers and students of a capacity-gap sweep.

One shape rule for the whole family (fixed ``head_dim``; width = heads x head_dim; depth grows with
width at a fixed ``hidden_per_layer`` aspect ratio; SwiGLU width ~ 8/3 hidden rounded up to a
multiple), so that models in a ladder differ only in scale, never in design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import LlamaConfig

from hf_capgap.errors import ConfigError


@dataclass(frozen=True)
class LadderPreset:
    """A named family: its target sizes and the one shape option that differs between presets."""

    sizes: tuple[int, ...]
    head_dim: int = 32


LADDERS: dict[str, LadderPreset] = {
    "micro": LadderPreset((30_000, 90_000, 270_000)),
    # 16-wide heads and a 2048-token vocabulary: an embedding costs 32K params per head, so rungs sit
    # ~1.5x apart and pruned students of 110K-240K exist. Larger rungs were dropped: at the CPU token
    # budget they were no better than 664K (bench/results/ladder.md).
    "tiny": LadderPreset((126_000, 184_000, 243_000, 418_000, 664_000, 963_000), head_dim=16),
}


@dataclass(frozen=True)
class LadderRung:
    """One model of a ladder: its config, exact parameter counts, and the size it was chosen for."""

    name: str
    config: LlamaConfig
    params: int
    non_embedding_params: int
    target: int


def count_parameters(config: LlamaConfig) -> tuple[int, int]:
    """Exact ``(total, non_embedding)`` parameter counts of ``LlamaForCausalLM(config)``.

    Non-embedding excludes the input embedding and, when untied, the output projection (the
    Kaplan et al. convention). Matches ``sum(p.numel() for p in model.parameters())``.
    """
    if config.attention_bias or config.mlp_bias:
        raise ConfigError("count_parameters covers bias-free LLaMA configs: set attention_bias=mlp_bias=False.")
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    attention = 2 * hidden * config.num_attention_heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * config.intermediate_size
    per_layer = attention + mlp + 2 * hidden
    non_embedding = config.num_hidden_layers * per_layer + hidden
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return non_embedding + embeddings, non_embedding


def ladder_config(
    num_heads: int,
    vocab_size: int,
    *,
    head_dim: int = 32,
    hidden_per_layer: int = 64,
    heads_per_kv: int = 1,
    multiple_of: int = 32,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 2048,
) -> LlamaConfig:
    """The family's config for a width of ``num_heads`` heads (the single free variable)."""
    hidden = num_heads * head_dim
    intermediate = multiple_of * math.ceil(8 * hidden / 3 / multiple_of)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=max(1, round(hidden / hidden_per_layer)),
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // heads_per_kv,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )


def build_ladder(
    sizes: Sequence[int],
    vocab_size: int,
    *,
    head_dim: int = 32,
    hidden_per_layer: int = 64,
    heads_per_kv: int = 1,
    multiple_of: int = 32,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 2048,
    max_heads: int = 256,
) -> list[LadderRung]:
    """For each target size, the family member whose exact TOTAL parameter count is closest.

    Sizes are total parameters (embeddings included) because the law of capacity gap is stated in
    total parameters (MiniMA: teacher ~2.5x the student, counting everything). The trade-off: at
    tiny scale with an 8k vocabulary the embedding is a large share of a model, so a 2.5x gap in
    total params is a larger gap in non-embedding (compute) params; each rung records both counts
    so a sweep can fit the law either way. Raises ValueError if two targets land on the same shape.
    """
    if not sizes:
        raise ConfigError("sizes is empty: pass at least one target parameter count.")
    if vocab_size < 1:
        raise ConfigError(f"vocab_size={vocab_size} must be positive.")
    if heads_per_kv < 1:
        raise ConfigError(f"heads_per_kv={heads_per_kv} must be >= 1 (1 = full multi-head attention).")
    options = dict(
        head_dim=head_dim,
        hidden_per_layer=hidden_per_layer,
        heads_per_kv=heads_per_kv,
        multiple_of=multiple_of,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
    )
    family = [
        (count_parameters(config), config)
        for config in (
            ladder_config(heads, vocab_size, **options) for heads in range(heads_per_kv, max_heads + 1, heads_per_kv)
        )
    ]
    rungs = []
    for target in sizes:
        if target <= 0:
            raise ConfigError(f"sizes contains {target}: every target parameter count must be positive.")
        (total, non_embedding), config = min(family, key=lambda item: abs(item[0][0] - target))
        rungs.append(LadderRung(rung_name(total), config, total, non_embedding, target))
    names = [rung.name for rung in rungs]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"sizes {list(sizes)} map to repeated shapes {names}: spread the targets further apart or "
            "lower head_dim for a finer-grained family."
        )
    return rungs


def rung_name(params: int) -> str:
    """A readable, unique-per-size name such as ``llama-1.45M``."""
    if params >= 1_000_000_000:
        return f"llama-{params / 1e9:.2f}B"
    if params >= 1_000_000:
        return f"llama-{params / 1e6:.2f}M"
    return f"llama-{params / 1e3:.0f}K"
