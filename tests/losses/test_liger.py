"""The optional Liger backend: clear refusals, and the same objective as ours (against a stand-in)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hf_capgap.losses import DenseTeacher, FusedTeacher, LossSpec, distillation_loss
from hf_capgap.losses import liger as liger_backend
from hf_capgap.losses.liger import liger_distillation_loss, liger_unsupported, require_liger


def test_missing_liger_or_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        require_liger()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA GPU"):
        require_liger()


def test_only_the_dense_online_fused_case_is_supported():
    fused_teacher = FusedTeacher(torch.zeros(2, 4), torch.zeros(8, 4))
    assert liger_unsupported(LossSpec(), fused_teacher, fused=True, bias=None) is None
    assert "tvd" in liger_unsupported(LossSpec(kind="tvd"), fused_teacher, fused=True, bias=None)
    assert "cached" in liger_unsupported(LossSpec(), DenseTeacher(torch.zeros(2, 8)), fused=True, bias=None)
    assert "not fused" in liger_unsupported(LossSpec(), fused_teacher, fused=False, bias=None)
    assert "bias" in liger_unsupported(LossSpec(), fused_teacher, fused=True, bias=torch.zeros(8))
    assert liger_unsupported(LossSpec(alpha=0.0), None, fused=True, bias=None) is None  # CE alone (evaluation)


def stand_in_liger() -> types.ModuleType:
    """liger_kernel.transformers as documented: generalized JSD with teacher weight ``jsd_beta`` (0: forward KL,
    1: reverse KL), mean over labelled rows; fused linear CE with a reduction."""

    class LigerFusedLinearJSD(torch.nn.Module):
        def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0):
            super().__init__()
            self.beta, self.ignore_index, self.temperature = jsd_beta, ignore_index, temperature

        def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels=None):
            keep = shift_labels != self.ignore_index
            log_q = torch.log_softmax((student_input @ student_weight.t())[keep] / self.temperature, -1)
            log_p = torch.log_softmax((teacher_input @ teacher_weight.t())[keep] / self.temperature, -1)
            p, q = log_p.exp(), log_q.exp()
            if self.beta == 0:
                per_row = (p * (log_p - log_q)).sum(-1)
            elif self.beta == 1:
                per_row = (q * (log_q - log_p)).sum(-1)
            else:
                log_m = (self.beta * p + (1 - self.beta) * q).log()
                per_row = self.beta * (p * (log_p - log_m)).sum(-1) + (1 - self.beta) * (q * (log_q - log_m)).sum(-1)
            return per_row.mean()

    class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, lin_weight, _input, target):
            return F.cross_entropy(
                _input @ lin_weight.t(), target, ignore_index=self.ignore_index, reduction=self.reduction
            )

    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearJSD = LigerFusedLinearJSD
    module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    return module


@pytest.mark.parametrize(
    ("kind", "beta", "alpha", "temperature"),
    [
        ("forward_kl", 0.5, 0.5, 1.0),
        ("reverse_kl", 0.5, 1.0, 2.0),
        ("jsd", 0.3, 0.7, 1.0),
        ("forward_kl", 0.5, 0.0, 1.0),
    ],
)
def test_same_objective_and_normalisation_as_ours(monkeypatch, kind, beta, alpha, temperature):
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", stand_in_liger())
    monkeypatch.setattr(liger_backend, "require_liger", lambda: None)
    hidden = torch.randn(30, 12, requires_grad=True)
    weight = (torch.randn(40, 12) / 4).requires_grad_(True)
    teacher = FusedTeacher(torch.randn(30, 16), torch.randn(40, 16) / 4) if alpha > 0 else None
    labels = torch.randint(0, 40, (30,))
    labels[::3] = -100
    spec = LossSpec(kind=kind, beta=beta, alpha=alpha, temperature=temperature, chunk_size=8)
    theirs = liger_distillation_loss(hidden, teacher, labels, spec, lm_head_weight=weight, num_items_in_batch=50)
    ours = distillation_loss(hidden, teacher, labels, spec, lm_head_weight=weight, num_items_in_batch=50)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.distill_sum, ours.distill_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.ce_sum, ours.ce_sum, rtol=1e-5, atol=1e-5)
    for mine, reference in zip(
        torch.autograd.grad(theirs.loss, (hidden, weight)),
        torch.autograd.grad(ours.loss, (hidden, weight)),
        strict=True,
    ):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


def test_trainer_says_liger_logs_no_entropy_or_accuracy(monkeypatch, tmp_path, tiny_tokenizer, tiny_text_dataset):
    """Liger's fused losses return neither the student's entropy nor its argmax: with loss_backend='liger'
    the trainer says so once and logs the losses alone (the loss still equals ours)."""
    from transformers.testing_utils import CaptureLogger

    import hf_capgap.trainer.trainer
    from hf_capgap import DistillationConfig, DistillationTrainer
    from tests.conftest import tiny_llama

    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", stand_in_liger())
    monkeypatch.setattr(liger_backend, "require_liger", lambda: None)
    logs = {}
    for backend in ("liger", "hf_capgap"):
        torch.manual_seed(0)
        teacher, student = tiny_llama(len(tiny_tokenizer)), tiny_llama(len(tiny_tokenizer))
        args = DistillationConfig(
            output_dir=str(tmp_path / backend),
            loss_backend=backend,
            per_device_train_batch_size=4,
            max_steps=1,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            chunk_size=16,
        )
        with CaptureLogger(hf_capgap.trainer.trainer.logger) as captured:
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=tiny_text_dataset.select(range(4)),
                processing_class=tiny_tokenizer,
            )
        assert ("entropy and mean_token_accuracy are not logged" in captured.out) == (backend == "liger")
        trainer.train()
        logs[backend] = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert not {"entropy", "mean_token_accuracy"} & logs["liger"].keys()
    assert {"entropy", "mean_token_accuracy"} <= logs["hf_capgap"].keys()
    for name in ("loss", "distill_loss", "ce_loss"):
        assert logs["liger"][name] == pytest.approx(logs["hf_capgap"][name], rel=1e-5, abs=1e-6)
