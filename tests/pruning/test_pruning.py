"""Structured pruning: exactness of the slicing, shape search, scores, saving, CLI and error cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from hf_capgap import cli
from hf_capgap.pruning import (
    PruneSelection,
    PruneShape,
    apply_selection,
    prune_model,
    pruned_config,
    save_pruned,
    shape_for_target,
    shape_params,
)
from hf_capgap.pruning.importance import magnitude_importance, taylor_importance
from hf_capgap.pruning.layouts import meta_model, param_counter
from hf_capgap.utils.artifacts import MANIFEST_NAME, model_fingerprint, read_manifest

VOCAB = 64


def llama_config(**overrides) -> LlamaConfig:
    values = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
    }
    return LlamaConfig(**(values | overrides))


def gpt2_config(**overrides) -> GPT2Config:
    values = {
        "vocab_size": VOCAB,
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 32,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    return GPT2Config(**(values | overrides))


CONFIGS = {
    "llama_gqa": llama_config,
    "llama_mha_bias": lambda: llama_config(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "qwen2_gqa_tied": lambda: Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        tie_word_embeddings=True,
    ),
    "gpt_neox_parallel": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        rotary_pct=0.25,
    ),
    "gpt_neox_sequential": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        rotary_pct=0.5,
        use_parallel_residual=False,
    ),
    "gpt2_inner_default": lambda: gpt2_config(scale_attn_by_inverse_layer_idx=True),
}


def build(config) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at exactly 1 / 0; randomise them so slicing mistakes show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def batches(n: int = 2, seq: int = 12):
    return [{"input_ids": torch.randint(0, VOCAB, (2, seq))} for _ in range(n)]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _one_thread():
    """The models are tiny; extra threads only contend for the shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(CONFIGS))
def teacher(request):
    return build(CONFIGS[request.param]())


def test_full_shape_reproduces_teacher_exactly(teacher):
    ids = torch.randint(0, VOCAB, (2, 12))
    student = prune_model(teacher, shape=PruneShape.of(teacher.config), calibration=batches())
    assert type(student) is type(teacher)
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-6, rtol=0)


def test_permuted_complete_selection_is_exact(teacher):
    shape = PruneShape.of(teacher.config)
    layers = list(range(shape.num_hidden_layers))
    selection = PruneSelection(
        layers=layers,
        hidden=torch.randperm(shape.hidden_size),
        heads=[torch.randperm(shape.num_key_value_heads) for _ in layers],
        neurons=[torch.randperm(shape.intermediate_size) for _ in layers],
    )
    ids = torch.randint(0, VOCAB, (2, 12))
    student = apply_selection(teacher, selection)
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=0)


def test_target_params_within_two_percent_and_keeps_architecture(teacher):
    config = teacher.config
    before = model_fingerprint(teacher)
    target = n_params(teacher) // 2
    student = prune_model(teacher, target_params=target, calibration=batches())
    assert abs(n_params(student) - target) <= 0.02 * target
    assert model_fingerprint(teacher) == before  # scoring and slicing never touch the teacher
    assert getattr(student.config, "rope_parameters", None) == getattr(config, "rope_parameters", None)
    assert student.config.tie_word_embeddings == config.tie_word_embeddings
    assert (student.lm_head.weight is student.get_input_embeddings().weight) == config.tie_word_embeddings
    shape = PruneShape.of(student.config)
    assert shape.num_attention_heads // shape.num_key_value_heads == (
        config.num_attention_heads // PruneShape.of(config).num_key_value_heads
    )
    assert (
        student.config.hidden_size // student.config.num_attention_heads
        == config.hidden_size // config.num_attention_heads
    )
    assert student.pruning_record.importance == "taylor"
    assert student(torch.randint(0, VOCAB, (1, 8))).logits.shape == (1, 8, VOCAB)


def test_minima_3b_shape_from_llama2_7b_on_meta_device():
    llama2_7b = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=4096,
    )
    minima = PruneShape(hidden_size=3072, num_hidden_layers=24, num_attention_heads=24, intermediate_size=8192)
    teacher = meta_model(llama2_7b)
    student = meta_model(pruned_config(llama2_7b, minima))
    count = n_params(student)
    assert all(p.is_meta for p in student.parameters())
    assert count == shape_params(teacher, minima)
    assert abs(count - 3.0e9) / 3.0e9 < 0.03
    assert student.config.head_dim == 128 and student.config.num_key_value_heads == 24
    assert shape_for_target(teacher, count) == PruneShape(**{**minima.to_dict(), "num_key_value_heads": 24})


def test_taylor_scores_drop_a_dead_neuron_and_magnitude_fallback_warns():
    teacher = build(llama_config(num_hidden_layers=2))
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.down_proj.weight[:, 5] = 0.0  # neuron 5 never reaches the residual stream
    shape = PruneShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
    student = prune_model(teacher, shape=shape, calibration=batches())
    kept_rows = {tuple(row.tolist()) for row in teacher.model.layers[0].mlp.up_proj.weight}
    removed = tuple(teacher.model.layers[0].mlp.up_proj.weight[5].tolist())
    assert removed in kept_rows and removed not in {
        tuple(r.tolist()) for r in student.model.layers[0].mlp.up_proj.weight
    }
    with pytest.warns(UserWarning, match="weight magnitude"):
        fallback = prune_model(teacher, shape=shape)
    assert fallback.pruning_record.importance == "magnitude"
    assert not torch.any(torch.all(fallback.model.layers[0].mlp.down_proj.weight == 0, dim=0))


@pytest.mark.parametrize("config", [llama_config(num_hidden_layers=2), gpt2_config(n_layer=2)], ids=["llama", "gpt2"])
def test_checkpointed_taylor_scores_equal_the_plain_ones(config):
    teacher, calibration = build(config), batches()
    plain = taylor_importance(teacher, calibration)
    checkpointed = taylor_importance(teacher, calibration, checkpoint_layers=True)
    for name in ("hidden", "heads", "neurons", "layers"):
        torch.testing.assert_close(getattr(checkpointed, name), getattr(plain, name))
    assert all("forward" not in vars(layer) for layer in teacher.modules())  # the wrapping is undone


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("config", [llama_config, gpt2_config], ids=["llama", "gpt2_learned_positions"])
def test_padded_and_masked_calibration_scores_and_prunes_like_the_unpadded_rows(config, side):
    teacher = build(config())
    rows = [torch.randint(2, VOCAB, (2, 10)) for _ in range(2)]

    def pad(real: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return torch.cat([real, fill] if side == "right" else [fill, real], dim=1)

    pads = torch.zeros(2, 4, dtype=torch.long)
    padded = [
        {"input_ids": pad(ids, pads), "attention_mask": pad(torch.ones(2, 10, dtype=torch.long), pads)} for ids in rows
    ]
    unpadded = [{"input_ids": ids} for ids in rows]
    plain, masked = taylor_importance(teacher, unpadded), taylor_importance(teacher, padded)
    for unit in ("hidden", "heads", "neurons", "layers"):
        torch.testing.assert_close(getattr(masked, unit), getattr(plain, unit), rtol=1e-4, atol=1e-7)
    assert masked.calibration_tokens == plain.calibration_tokens == 40
    target = n_params(teacher) // 2
    students = [prune_model(teacher, target_params=target, calibration=data) for data in (unpadded, padded)]
    assert students[0].pruning_record.kept == students[1].pruning_record.kept
    for name, tensor in students[0].state_dict().items():
        assert torch.equal(tensor, students[1].state_dict()[name]), name


def test_gpt2_config_keeps_every_setting_and_counts_the_hub_sizes():
    teacher = gpt2_config(
        n_positions=48,
        activation_function="gelu",
        layer_norm_epsilon=1e-4,
        scale_attn_weights=False,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
    )
    shape = PruneShape(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    student = pruned_config(teacher, shape)
    resized = {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": 24}
    assert {key: getattr(student, key) for key in resized} == resized
    assert student.to_dict() == teacher.to_dict() | resized
    assert n_params(meta_model(student)) == shape_params(meta_model(teacher), shape)

    gpt2_small = meta_model(GPT2Config())  # what the Hub's gpt2 checkpoint holds, with the tied head once
    assert param_counter(gpt2_small)(PruneShape.of(gpt2_small.config)) == n_params(gpt2_small) == 124_439_808
    target = 60_000_000
    cut = shape_for_target(gpt2_small, target)
    assert cut.hidden_size == 64 * cut.num_attention_heads
    assert abs(n_params(meta_model(pruned_config(gpt2_small.config, cut))) - target) <= 0.02 * target


def test_gpt2_scores_see_position_embeddings_and_all_three_attention_blocks():
    teacher = build(gpt2_config(n_layer=2))
    dim, head = 5, 2
    with torch.no_grad():
        teacher.transformer.wte.weight[:, dim] = 0.0  # dim carries only the position signal
        teacher.transformer.wpe.weight[:, dim] = 3.0
        for layer in teacher.transformer.h:
            layer.attn.c_proj.weight[:, dim] = layer.attn.c_proj.bias[dim] = 0.0
            layer.mlp.c_proj.weight[:, dim] = layer.mlp.c_proj.bias[dim] = 0.0
    assert float(taylor_importance(teacher, batches(1)).hidden[dim]) > 0

    width = 8  # head_dim: q, k and v of head 2 sit at columns 16:24, 48:56 and 80:88 of c_attn
    with torch.no_grad():
        teacher.transformer.h[0].attn.c_attn.weight[:, 64 + head * width : 64 + (head + 1) * width] = 100.0
    with pytest.warns(UserWarning, match="weight magnitude"):
        scores = magnitude_importance(teacher)
    assert int(scores.heads[0].argmax()) == head


def test_student_keeps_dtype_and_per_layer_attention_types():
    teacher = build(llama_config()).to(torch.bfloat16)
    shape = PruneShape(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    student = prune_model(teacher, shape=shape, calibration=batches(1))
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16} and student.config.dtype == torch.bfloat16
    assert student.config.head_dim == 8 and student.model.rotary_emb.inv_freq.shape == (4,)

    sliding = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    assert sliding.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    config = pruned_config(
        sliding,
        PruneShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
        kept_layers=[0, 2],
    )
    assert config.layer_types == ["full_attention", "sliding_attention"] and config.max_window_layers == 1


def test_layer_selection_middle_and_explicit():
    teacher = build(llama_config(num_hidden_layers=6))
    shape = PruneShape(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)
    for selection, kept in (("middle", [1, 2, 3]), ([0, 2, 5], [0, 2, 5])):
        student = prune_model(teacher, shape=shape, calibration=batches(1), layer_selection=selection)
        assert student.pruning_record.kept["layers"] == kept
        for new, old in enumerate(kept):
            assert torch.equal(
                student.model.layers[new].self_attn.q_proj.weight, teacher.model.layers[old].self_attn.q_proj.weight
            )


def _toy_sequences(count: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """A cycle through a fixed permutation of the vocabulary: learnable, far from uniform."""
    successor = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))
    rows = torch.empty(count, seq, dtype=torch.long)
    rows[:, 0] = torch.randint(0, VOCAB, (count,), generator=generator)
    for t in range(1, seq):
        rows[:, t] = successor[rows[:, t - 1]]
    return rows


def _loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize(
    "config",
    [
        llama_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96),
        gpt2_config(n_embd=48, n_head=6, n_inner=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ],
    ids=["llama", "gpt2"],
)
def test_pruned_student_starts_far_below_random_init(config):
    generator = torch.Generator().manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(40):
        ids = _toy_sequences(16, 16, generator)
        teacher(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()
    validation = _toy_sequences(32, 16, generator)
    calibration = [{"input_ids": _toy_sequences(8, 16, generator)} for _ in range(2)]
    student = prune_model(teacher, target_params=n_params(teacher) // 2, calibration=calibration)
    random_init = AutoModelForCausalLM.from_config(student.config).eval()
    assert n_params(random_init) == n_params(student)
    teacher_loss, student_loss, random_loss = (_loss(m, validation) for m in (teacher, student, random_init))
    assert teacher_loss < 0.5 * math.log(VOCAB)
    assert student_loss < 0.5 * random_loss


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "gpt2_inner_default"])
def test_save_pruned_reloads_with_auto_class(tmp_path, name):
    teacher = build(CONFIGS[name]())
    target = n_params(teacher) * 6 // 10
    student = prune_model(teacher, target_params=target, calibration=batches(1))
    out = save_pruned(student, tmp_path / "student", teacher_name=f"tiny-{name}")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, VOCAB, (1, 10))
    assert n_params(reloaded) == n_params(student) and abs(n_params(reloaded) - target) <= 0.02 * target
    torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, atol=1e-6, rtol=0)
    manifest = read_manifest(
        out, "pruned_student", 1, verify_files=True, expected={"teacher_fingerprint": model_fingerprint(teacher)}
    )
    assert manifest["teacher_name"] == f"tiny-{name}"
    assert manifest["shape"] == PruneShape.of(student.config).to_dict()
    assert manifest["kept_fraction"] == pytest.approx(n_params(student) / n_params(teacher))
    assert manifest["calibration_tokens"] == 24 and manifest["importance"] == "taylor"
    assert any(name.endswith(".safetensors") for name in manifest["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_student_generates_like_the_teacher_after_pruning_and_saving(tmp_path):
    from transformers import GenerationConfig

    teacher = build(llama_config(bos_token_id=0, eos_token_id=2))
    teacher.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=[1, 5], pad_token_id=3, do_sample=True, temperature=0.6, top_p=0.9
    )
    student = prune_model(teacher, target_params=n_params(teacher) // 2, calibration=batches(1))
    assert student.generation_config == teacher.generation_config
    assert student.generation_config is not teacher.generation_config
    save_pruned(student, tmp_path / "student", teacher_name="tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.generation_config.eos_token_id == [1, 5] and reloaded.generation_config.temperature == 0.6
    assert reloaded.generation_config == teacher.generation_config


def test_save_pruned_failure_leaves_nothing(tmp_path):
    teacher = build(llama_config())
    student = prune_model(teacher, shape=PruneShape.of(teacher.config), calibration=batches(1))

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(student, tmp_path / "student", teacher_name="t", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="pruning_record"):
        save_pruned(teacher, tmp_path / "teacher", teacher_name="t")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_params": 10**9}, "larger than the teacher"),
        ({"target_params": 10}, "no shape"),
        (
            {"shape": {"hidden_size": 30, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 8}},
            "num_attention_heads=4 does not divide",
        ),
        (
            {"shape": {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 8}},
            "num_key_value_heads",
        ),
        (
            {"shape": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 8}},
            "num_hidden_layers=4 exceeds",
        ),
        ({"shape": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}}, "missing"),
        (
            {
                "shape": {
                    "hidden_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 8,
                    "num_layers": 2,
                }
            },
            "unknown keys",
        ),
        ({}, "exactly one"),
        ({"target_params": 5000, "layer_selection": "first"}, "layer_selection"),
        ({"target_params": 5000, "layer_selection": [2, 0]}, "increasing order"),
        ({"target_params": 5000, "calibration": []}, "calibration is empty"),
        ({"target_params": 5000, "calibration": [{"input_ids": torch.tensor([[1, VOCAB + 3]])}]}, "vocab_size"),
        ({"target_params": 5000, "calibration": [{"text": "hello"}]}, "input_ids"),
    ],
)
def test_invalid_requests_fail_with_named_field(kwargs, message):
    teacher = build(llama_config())
    with pytest.raises(ValueError, match=message):
        prune_model(teacher, **kwargs)


def test_unsupported_architecture_and_neox_head_size():
    opt = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
        )
    )
    with pytest.raises(ValueError, match="opt.*supported model types are llama, mistral, qwen2, gpt_neox, gpt2"):
        prune_model(opt, target_params=1000)
    cross = AutoModelForCausalLM.from_config(gpt2_config(n_layer=1, add_cross_attention=True))
    with pytest.raises(ValueError, match="add_cross_attention"):
        prune_model(cross, target_params=1000)
    neox = build(CONFIGS["gpt_neox_parallel"]())
    with pytest.raises(ValueError, match="shape.hidden_size must be num_attention_heads x 8"):
        prune_model(
            neox, shape={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8}
        )


def _save_teacher_with_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [
        "<unk>",
        "</s>",
        "the",
        "and",
        "of",
        "to",
        "I",
        "you",
        "a",
        "my",
        "in",
        "that",
        "is",
        "not",
        "And",
        "me",
        "it",
        "with",
        "his",
        "be",
        "your",
        "for",
        "he",
        "this",
        "The",
        "shall",
        "have",
        "thou",
        "will",
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    build(llama_config()).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_cli_prunes_a_saved_teacher(tmp_path, capsys):
    _save_teacher_with_tokenizer(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    target = n_params(teacher) // 2
    argv = [
        "prune",
        str(tmp_path / "teacher"),
        "--target-params",
        str(target),
        "--out",
        str(tmp_path / "student"),
        "--calibration-tokens",
        "64",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
    ]
    assert cli.main(argv) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert abs(n_params(student) - target) <= 0.02 * target
    manifest = json.loads((tmp_path / "student" / MANIFEST_NAME).read_text())
    assert manifest["importance"] == "taylor" and manifest["calibration_tokens"] == 64
    assert (tmp_path / "student" / "tokenizer.json").is_file()
    assert "wrote" in capsys.readouterr().out

    with pytest.warns(UserWarning, match="weight magnitude"):
        assert cli.main([*argv[:5], str(tmp_path / "magnitude"), "--calibration-tokens", "0"]) == 0
    assert json.loads((tmp_path / "magnitude" / MANIFEST_NAME).read_text())["importance"] == "magnitude"

    assert cli.main(argv) == 2  # --out exists
    assert cli.main(["prune", str(tmp_path / "missing"), "--target-params", "1000", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["prune", str(tmp_path / "teacher"), "--target-params", "1B", "--out", str(tmp_path / "y")]) == 2
    assert "larger than the teacher" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_refuses_a_multi_process_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["prune", str(tmp_path / "teacher"), "--target-params", "1000", "--out", str(tmp_path / "student")]
    assert cli.main(argv) == 2
    assert "pruning runs in one" in capsys.readouterr().err
