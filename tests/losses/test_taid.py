"""TAID's loss (Shing et al., ICLR 2025) on the chunked and fused paths against a plain dense PyTorch
computation: value and gradient, at several interpolation weights t and temperatures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_capgap.errors import ConfigError
from hf_capgap.losses import (
    DenseTeacher,
    FusedTeacher,
    LossSpec,
    SampledTeacher,
    TopKTeacher,
    distillation_loss,
    divergence,
)


def plain_taid(student_logits, teacher_logits, labels, t, temperature, alpha):
    """alpha * T^2 * KL(p_t || q) + (1 - alpha) * CE, written from the paper's definition:
    p_t = softmax(((1 - t) * stopgrad(z_student) + t * z_teacher) / T), q = softmax(z_student / T)."""
    valid = labels != -100
    s, z = student_logits[valid].float(), teacher_logits[valid].float()
    p_t = torch.softmax(((1 - t) * s.detach() + t * z) / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    kl = (p_t * (p_t.log() - log_q)).sum(-1).mean() * temperature**2
    return alpha * kl + (1 - alpha) * F.cross_entropy(s, labels[valid])


def make_batch(n=40, vocab=37, hidden=12):
    hidden_states = torch.randn(n, hidden)
    weight = torch.randn(vocab, hidden) / math.sqrt(hidden)
    teacher = torch.randn(n, vocab) * 2
    labels = torch.randint(0, vocab, (n,))
    labels[::4] = -100
    return hidden_states, weight, teacher, labels


@pytest.mark.parametrize("t", [0.0, 0.4, 0.75, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_reference_equals_plain_formula_and_t1_is_forward_kl(t, temperature):
    _, _, teacher, labels = make_batch()
    student = torch.randn_like(teacher, requires_grad=True)
    ours = divergence(student, teacher, labels, "taid", temperature=temperature, taid_t=t)
    plain = plain_taid(student, teacher, labels, t, temperature, alpha=1.0)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*(torch.autograd.grad(x, student)[0] for x in (ours, plain)), rtol=1e-5, atol=1e-7)
    if t == 1.0:
        forward = divergence(student, teacher, labels, "forward_kl", temperature=temperature)
        torch.testing.assert_close(ours, forward, rtol=1e-5, atol=1e-6)
    if t == 0.0:
        assert ours.abs() < 1e-5  # the target is the student itself


@pytest.mark.parametrize("t", [0.0, 0.4, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("teacher_kind", ["logits", "fused", "dense_cache"])
@pytest.mark.parametrize("fused_student", [False, True])
def test_chunked_and_fused_taid_equal_the_dense_reference(t, temperature, alpha, teacher_kind, fused_student):
    hidden, weight, teacher_logits, labels = make_batch()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(hidden.shape[0], 9), torch.randn(weight.shape[0], 9)
    if teacher_kind == "fused":
        teacher_logits = teacher_hidden @ teacher_weight.t()
        signal = FusedTeacher(teacher_hidden, teacher_weight)
    elif teacher_kind == "dense_cache":  # log-probs at the temperature, one row per labelled row
        valid = labels != -100
        signal = DenseTeacher(F.log_softmax(teacher_logits[valid] / temperature, -1), tempered_logprobs=True)
    else:
        signal = DenseTeacher(teacher_logits)
    spec = LossSpec(kind="taid", temperature=temperature, alpha=alpha, chunk_size=7, taid_t=t)
    if fused_student:
        output = distillation_loss(hidden, signal, labels, spec, lm_head_weight=weight)
    else:
        output = distillation_loss(hidden @ weight.t(), signal, labels, spec)
    plain = plain_taid(hidden @ weight.t(), teacher_logits, labels, t, temperature, alpha)
    torch.testing.assert_close(output.loss, plain, rtol=1e-5, atol=1e-6)
    for ours, want in zip(
        torch.autograd.grad(output.loss, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)), strict=True
    ):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # values only: the same formula without the gradient buffers
        values = distillation_loss(hidden @ weight.t(), signal, labels, spec)
    torch.testing.assert_close(values.loss, plain.detach(), rtol=1e-5, atol=1e-6)


def test_taid_needs_t_and_a_full_distribution_teacher():
    _, _, teacher, labels = make_batch()
    student = torch.randn_like(teacher)
    with pytest.raises(ConfigError, match="taid_t in \\[0, 1\\], got None"):
        distillation_loss(student, DenseTeacher(teacher), labels, LossSpec(kind="taid"))
    with pytest.raises(ConfigError, match="taid_t in \\[0, 1\\], got 1.5"):
        divergence(student, teacher, labels, "taid", taid_t=1.5)
    rows = teacher.shape[0]
    top = TopKTeacher(torch.zeros(rows, 2, dtype=torch.long), torch.full((rows, 2), -1.0), torch.full((rows,), -1.0))
    sampled = SampledTeacher(torch.zeros(rows, 2, dtype=torch.long), torch.ones(rows, 2), entropy=torch.ones(rows))
    for signal in (top, sampled):
        with pytest.raises(ConfigError, match=f"loss='taid'.*{type(signal).__name__}"):
            distillation_loss(student, signal, labels, LossSpec(kind="taid", taid_t=0.5))
