"""The one teacher loader: dtype by device, eval mode without gradients, safetensors only."""

from __future__ import annotations

import pytest
import torch

from hf_capgap.models import load_frozen_teacher, resolve_teacher_dtype
from tests.conftest import tiny_llama


def test_loads_frozen_in_float32_on_the_cpu(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "teacher")
    teacher = load_frozen_teacher(str(tmp_path / "teacher"), device="cpu")
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert {p.device.type for p in teacher.parameters()} == {"cpu"}


def test_dtype_choice():
    assert resolve_teacher_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_teacher_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_teacher_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="teacher_dtype='fp8'"):
        resolve_teacher_dtype("fp8", torch.device("cpu"))


def test_bfloat16_request_is_honoured(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "teacher")
    teacher = load_frozen_teacher(tmp_path / "teacher", teacher_dtype="bfloat16", device="cpu")
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def test_pickled_checkpoint_is_refused(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "teacher" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_frozen_teacher(tmp_path / "teacher", device="cpu")


def test_teacher_in_dtype_converts_a_copy_and_keeps_ties():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_capgap.models import teacher_in_dtype

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )
    assert teacher_in_dtype(model, torch.float32) is model
    converted = teacher_in_dtype(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    torch.testing.assert_close(converted.lm_head.weight, model.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0)


def test_teacher_in_dtype_matches_from_pretrained_and_keeps_rope_buffers_float32(tmp_path):
    """A teacher loaded in bf16 is returned as is; an fp32 one is converted as loading in bf16 converts
    it: parameters in bf16, the non-persistent RoPE ``inv_freq`` left in float32 (rounded to bf16, the
    rotary phase of position 1000 is off by up to ~0.4 in cos)."""
    from transformers import AutoModelForCausalLM

    from hf_capgap.models import teacher_in_dtype

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, heads=2, kv_heads=2)
    model.save_pretrained(tmp_path / "teacher")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.bfloat16)
    assert teacher_in_dtype(loaded, torch.bfloat16) is loaded
    frozen = load_frozen_teacher(tmp_path / "teacher", teacher_dtype="bfloat16", device="cpu")
    assert teacher_in_dtype(frozen, torch.bfloat16) is frozen

    converted = teacher_in_dtype(model, torch.bfloat16)
    assert converted is not model
    assert {n: t.dtype for n, t in converted.state_dict().items()} == {
        n: t.dtype for n, t in loaded.state_dict().items()
    }
    assert {n: b.dtype for n, b in converted.named_buffers()} == {n: b.dtype for n, b in loaded.named_buffers()}
    assert {b.dtype for b in model.buffers()} == {torch.float32}
    positions = torch.tensor([[10, 1000, 3000]])
    x = torch.zeros(1, 3, 64, dtype=torch.bfloat16)
    for want, got in zip(loaded.model.rotary_emb(x, positions), converted.model.rotary_emb(x, positions), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ids = torch.arange(100).remainder(96)[None]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_teacher_in_dtype_keeps_the_modules_transformers_keeps_in_float32(tmp_path):
    """``_keep_in_fp32_modules_strict`` (MoE routers, score biases) stays float32 when loading in bf16:
    such a teacher is in bf16 as loaded, and an fp32 one is converted the same way."""
    from transformers import LlamaForCausalLM

    from hf_capgap.models import teacher_in_dtype

    class RouterInFloat32(LlamaForCausalLM):
        _keep_in_fp32_modules_strict = ["lm_head"]

    model = RouterInFloat32(tiny_llama().config)
    model.save_pretrained(tmp_path / "teacher")
    loaded = RouterInFloat32.from_pretrained(tmp_path / "teacher", dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.float32
    assert teacher_in_dtype(loaded, torch.bfloat16) is loaded
    converted = teacher_in_dtype(model, torch.bfloat16)
    assert {n: t.dtype for n, t in converted.state_dict().items()} == {
        n: t.dtype for n, t in loaded.state_dict().items()
    }


def test_a_config_only_folder_is_refused_naming_the_missing_files(tmp_path):
    """Before anything loads, not as transformers' "You need to have sentencepiece or tiktoken installed"."""
    from hf_capgap.errors import ModelFolderError
    from hf_capgap.models import check_model_folder

    folder = tmp_path / "teacher"
    tiny_llama().config.save_pretrained(folder)
    missing = r"missing a tokenizer \(one of tokenizer.json.* and the weights \(\*.safetensors"
    with pytest.raises(ModelFolderError, match=missing):
        check_model_folder(folder)
    with pytest.raises(ValueError, match=r"holds config.json\); save the model and its tokenizer into it"):
        load_frozen_teacher(folder, device="cpu")


def test_a_sharded_folder_missing_a_shard_is_named(tmp_path):
    from hf_capgap.models import check_model_folder

    folder = tmp_path / "teacher"
    tiny_llama().save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    check_model_folder(folder, tokenizer=False)
    shards[-1].unlink()
    with pytest.raises(ValueError, match=rf"missing {shards[-1].name} \(listed in model.safetensors.index.json\)"):
        check_model_folder(folder, tokenizer=False)


def test_the_minima_recipe_refuses_a_config_only_teacher_folder_before_loading(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded from a folder that cannot hold one")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    tiny_llama().config.save_pretrained(tmp_path / "teacher")
    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / "minima.py"
    spec = importlib.util.spec_from_file_location("minima_recipe", recipe_path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(SystemExit) as info:
        recipe.main(
            ["--teacher", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "out"), "--student_params", "8K"]
        )
    assert str(info.value.code).startswith(f"minima: model folder {tmp_path / 'teacher'} is missing a tokenizer")
    assert "the weights (*.safetensors or model.safetensors.index.json) (it holds config.json)" in info.value.code


def test_teacher_in_dtype_keeps_float32_modules_of_a_peft_wrapped_teacher():
    """A PEFT-wrapped teacher (not a PreTrainedModel itself) keeps its base model's float32 modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from hf_capgap.models import teacher_in_dtype

    class RouterInFloat32(LlamaForCausalLM):
        _keep_in_fp32_modules_strict = ["lm_head"]

    wrapped = get_peft_model(RouterInFloat32(tiny_llama().config), LoraConfig(r=2, target_modules=["q_proj"]))
    converted = teacher_in_dtype(wrapped, torch.bfloat16).get_base_model()
    assert converted.lm_head.weight.dtype == torch.float32
    assert converted.model.embed_tokens.weight.dtype == torch.bfloat16


def test_teacher_in_dtype_gives_non_persistent_buffers_the_dtype_loading_gives_them(tmp_path):
    """Non-persistent buffers are as the model computes them under the load dtype: RoPE's ``inv_freq`` in
    float32, but Gemma 2's ``embed_scale`` in bf16 (computed in the default dtype, which loading sets)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from hf_capgap.models import teacher_in_dtype

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    ))  # fmt: skip
    model.save_pretrained(tmp_path / "teacher")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.bfloat16)
    converted = teacher_in_dtype(model, torch.bfloat16)
    assert {n: b.dtype for n, b in converted.named_buffers()} == {n: b.dtype for n, b in loaded.named_buffers()}
    assert {b.dtype for b in model.buffers()} == {torch.float32}
    ids = torch.arange(40).remainder(96)[None]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_teacher_in_dtype_converts_a_model_whose_class_cannot_be_built_on_the_meta_device():
    from transformers import LlamaForCausalLM

    from hf_capgap.models.teacher_loading import teacher_in_dtype

    class NeedsMoreThanItsConfig(LlamaForCausalLM):
        def __init__(self, config, weights_path=None):
            if weights_path is None and torch.get_default_device().type == "meta":
                raise RuntimeError("needs weights_path")
            super().__init__(config)

    model = NeedsMoreThanItsConfig(tiny_llama().config)
    converted = teacher_in_dtype(model, torch.bfloat16)
    assert converted.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert converted.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
