"""The one teacher loader: dtype by device, eval mode without gradients, safetensors only."""

from __future__ import annotations

import pytest
import torch

from hf_capgap.teacher_loading import load_frozen_teacher, resolve_teacher_dtype
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

    from hf_capgap.teacher_loading import teacher_in_dtype

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    ))
    assert teacher_in_dtype(model, torch.float32) is model
    converted = teacher_in_dtype(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    torch.testing.assert_close(converted.lm_head.weight, model.lm_head.weight.to(torch.bfloat16), rtol=0, atol=0)
