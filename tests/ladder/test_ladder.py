"""Model ladder: exact parameter counts and a consistent shape rule."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from hf_capgap.ladder import LADDERS, build_ladder, count_parameters


def _instantiated_counts(config: LlamaConfig) -> tuple[int, int]:
    model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    if not config.tie_word_embeddings:
        embeddings += model.get_output_embeddings().weight.numel()
    return total, total - embeddings


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tie_word_embeddings": False},
        {"heads_per_kv": 2},
        {"head_dim": 16, "hidden_per_layer": 32, "multiple_of": 64},
    ],
)
def test_exact_counts_equal_instantiated_models(options):
    rungs = build_ladder([80_000, 1_500_000], vocab_size=512, **options)
    for rung in rungs:
        assert (rung.params, rung.non_embedding_params) == _instantiated_counts(rung.config)
        assert count_parameters(rung.config) == (rung.params, rung.non_embedding_params)


def test_each_rung_is_the_closest_family_member():
    rungs = build_ladder([60_000, 200_000, 600_000], vocab_size=512)
    family = [rung.params for rung in build_ladder([1, 10**9], vocab_size=512, max_heads=64)]
    smallest, largest = family
    assert smallest < 60_000 and largest > 600_000
    for rung in rungs:
        nearer = build_ladder([rung.target], vocab_size=512)[0]
        assert nearer.params == rung.params
        assert abs(rung.params - rung.target) <= abs(_instantiated_counts(rung.config)[0] - rung.target)
    assert [r.params for r in rungs] == sorted(r.params for r in rungs)


def test_shape_rule_grows_depth_and_width_together():
    rungs = build_ladder(LADDERS["tiny"].sizes, vocab_size=2048, head_dim=LADDERS["tiny"].head_dim)
    hidden = [r.config.hidden_size for r in rungs]
    layers = [r.config.num_hidden_layers for r in rungs]
    assert hidden == sorted(hidden) and layers == sorted(layers) and layers[-1] > layers[0]
    for rung in rungs:
        config = rung.config
        assert config.head_dim * config.num_attention_heads == config.hidden_size
        assert config.intermediate_size % 32 == 0
        assert 8 / 3 * config.hidden_size <= config.intermediate_size < 8 / 3 * config.hidden_size + 32
    assert rungs[-1].params / rungs[0].params >= 7 and len(rungs) >= 5
    assert len({r.name for r in rungs}) == len(rungs)


def test_micro_preset_is_small_and_distinct():
    rungs = build_ladder(LADDERS["micro"].sizes, vocab_size=512)
    assert len({r.name for r in rungs}) == len(rungs) >= 2
    assert all(r.params < 500_000 for r in rungs)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="sizes"):
        build_ladder([], vocab_size=512)
    with pytest.raises(ValueError, match="sizes"):
        build_ladder([-5], vocab_size=512)
    with pytest.raises(ValueError, match="repeated shapes"):
        build_ladder([100_000, 100_001], vocab_size=512)
    with pytest.raises(ValueError, match="heads_per_kv"):
        build_ladder([100_000], vocab_size=512, heads_per_kv=0)
