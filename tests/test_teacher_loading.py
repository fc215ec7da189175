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
