"""The closed-form gradients of reverse KL, JSD, skew KL and TVD against autograd through the dense reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_capgap.losses import DenseTeacher, FusedTeacher, LossSpec, TopKTeacher, distillation_loss, divergence
from tests.losses.test_losses import RecordedOps

CASES = [("reverse_kl", 0.5), *[("jsd", beta) for beta in (0.1, 0.5, 0.9)], ("skew_kl", 0.0), ("skew_kl", 0.3)]
CASES.append(("tvd", 0.5))


def make_batch(n=30, vocab=23, hidden=10, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(n, hidden, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden)).to(dtype)
    teacher = (torch.randn(n, vocab, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[::3] = -100
    return hidden_states, weight, teacher, labels


def reference_objective(student_logits, teacher_logits, labels, kind, beta, temperature, alpha):
    """alpha * divergence (the dense reference, T^2 included) + (1 - alpha) * CE, per labelled row."""
    valid = labels != -100
    distill = divergence(student_logits, teacher_logits, labels, kind, beta, temperature)
    return alpha * distill + (1 - alpha) * F.cross_entropy(student_logits[valid].float(), labels[valid])


@pytest.mark.parametrize(("kind", "beta"), CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("path", ["logits", "logits-inplace", "fused"])
def test_closed_form_equals_autograd_through_the_reference(kind, beta, temperature, alpha, path):
    hidden, weight, teacher, labels = make_batch()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    spec = LossSpec(kind=kind, beta=beta, temperature=temperature, alpha=alpha, chunk_size=4)
    if path == "fused":
        ours = distillation_loss(hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight).loss
    else:
        logits = hidden @ weight.t()
        inplace = path == "logits-inplace"
        ours = distillation_loss(logits, DenseTeacher(teacher), labels, spec, inplace_grad=inplace).loss
    reference = reference_objective(hidden @ weight.t(), teacher, labels, kind, beta, temperature, alpha)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(
        torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(reference, (hidden, weight)), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", 0.5), ("jsd", 0.2), ("jsd", 0.8)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_teacher_and_student_with_bias(kind, beta, temperature):
    hidden, weight, _, labels = make_batch()
    bias = torch.randn(weight.shape[0], requires_grad=True)
    weight.requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(hidden.shape[0], 7), torch.randn(weight.shape[0], 7)
    spec = LossSpec(kind=kind, beta=beta, temperature=temperature, alpha=0.7, chunk_size=6)
    teacher = FusedTeacher(teacher_hidden, teacher_weight)
    ours = distillation_loss(hidden, teacher, labels, spec, lm_head_weight=weight, lm_head_bias=bias).loss
    reference = reference_objective(
        F.linear(hidden, weight, bias), teacher_hidden @ teacher_weight.t(), labels, kind, beta, temperature, 0.7
    )
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(
        torch.autograd.grad(ours, (weight, bias)), torch.autograd.grad(reference, (weight, bias)), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("fused", [False, True])
def test_bf16_inputs_match_the_reference_on_the_same_values(kind, fused):
    hidden, weight, teacher, labels = make_batch(dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    spec = LossSpec(kind=kind, beta=0.4, temperature=2.0, alpha=0.5, chunk_size=8)
    if fused:
        ours = distillation_loss(hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight).loss
    else:
        ours = distillation_loss(hidden @ weight.t(), DenseTeacher(teacher), labels, spec).loss
    reference = reference_objective(hidden @ weight.t(), teacher, labels, kind, 0.4, 2.0, 0.5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-5)
    (mine,) = torch.autograd.grad(ours, hidden)
    (theirs,) = torch.autograd.grad(reference, hidden)
    assert mine.dtype == torch.bfloat16
    torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize(
    ("kind", "beta"),
    [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("skew_kl", 0.0), ("skew_kl", 0.3), ("tvd", 0.5)],
)
def test_a_token_both_sides_rule_out_adds_nothing(kind, beta):
    """A column -inf in teacher and student (a vocabulary both mask) is 0 * log(0/0) = 0: finite loss and
    gradient equal to the reference on clamped logits."""
    _, _, teacher, labels = make_batch()
    student = torch.randn_like(teacher)
    student[:, 5] = teacher[:, 5] = -math.inf
    spec = LossSpec(kind=kind, beta=beta, temperature=1.0, alpha=1.0, chunk_size=7)
    masked = student.clone().requires_grad_(True)
    ours = distillation_loss(masked, DenseTeacher(teacher), labels, spec).loss
    finite = student.clamp(min=-1e4).requires_grad_(True)
    reference = divergence(finite, teacher.clamp(min=-1e4), labels, kind, beta)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    (mine,) = torch.autograd.grad(ours, masked)
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, torch.autograd.grad(reference, finite)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", 0.5), ("jsd", 0.3), ("skew_kl", 0.3), ("tvd", 0.5)])
def test_zero_probabilities_give_the_limits_not_nan(kind, beta):
    """-inf logits (masked tokens) give 0 * log 0 = 0 terms: the same loss and gradient as logits so low
    that their probability underflows to 0. (Autograd through the reference itself gives NaN there.)"""
    _, _, teacher, labels = make_batch()
    student = torch.randn_like(teacher)
    student[:, 3] = -math.inf
    if kind != "reverse_kl":  # reverse KL is infinite where the teacher has no mass and the student has some
        teacher[:, 5] = -math.inf
    spec = LossSpec(kind=kind, beta=beta, temperature=1.0, alpha=1.0, chunk_size=7)
    masked = student.clone().requires_grad_(True)
    ours = distillation_loss(masked, DenseTeacher(teacher), labels, spec).loss
    finite = student.clamp(min=-1e4).requires_grad_(True)
    reference = divergence(finite, teacher.clamp(min=-1e4), labels, kind, beta)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    (mine,) = torch.autograd.grad(ours, masked)
    torch.testing.assert_close(mine, torch.autograd.grad(reference, finite)[0], rtol=1e-5, atol=1e-7)


def topk_signal(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    values, ids = log_p.topk(k, dim=-1)
    return TopKTeacher(ids, values, torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7)))


def bucketed_reference(student_logits, signal, labels, kind, beta, temperature, alpha):
    """alpha * T^2 * the k + 1 bucket divergence by autograd (independent formulas) + (1 - alpha) * CE."""
    valid = labels != -100
    log_q = torch.log_softmax(student_logits[valid] / temperature, -1)
    ids = signal.ids[valid]
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, ids, False)
    q = torch.cat([log_q.gather(-1, ids).exp(), (log_q.exp() * outside).sum(-1, keepdim=True)], -1)
    p = torch.cat([signal.logprobs[valid].exp(), signal.tail_logprob[valid].exp()[:, None]], -1)
    if kind == "reverse_kl":
        rows = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        rows = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    ce = F.cross_entropy(student_logits[valid], labels[valid])
    return alpha * rows.mean() * temperature**2 + (1 - alpha) * ce


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 1.0), (1.0, 0.5), (2.0, 0.5)])
@pytest.mark.parametrize("fused", [False, True])
def test_topk_cache_signal_equals_bucketed_autograd(kind, beta, temperature, alpha, fused):
    """A top-k teacher cache (compacted to the labelled rows, as a cache stores it) on the closed form."""
    hidden, weight, teacher, labels = make_batch()
    signal = topk_signal(teacher, 5, temperature)
    compacted = signal.take(labels != -100)
    weight.requires_grad_(True)
    spec = LossSpec(kind=kind, beta=beta, temperature=temperature, alpha=alpha, chunk_size=6)
    head = {"lm_head_weight": weight} if fused else {}
    ours = distillation_loss(hidden if fused else hidden @ weight.t(), compacted, labels, spec, **head).loss
    reference = bucketed_reference(hidden @ weight.t(), signal, labels, kind, beta, temperature, alpha)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(ours, weight)[0], torch.autograd.grad(reference, weight)[0], rtol=1e-4, atol=1e-6
    )


def fresh_chunk_buffers(kind: str) -> float:
    """[rows, vocab] float tensors newly allocated per chunk (in-place and out= results excluded) by a fused
    loss at T = 2, alpha = 0.5, and whether any backward kernel ran."""
    hidden, weight, teacher, labels = make_batch(n=32, vocab=29)
    labels[:] = 1  # every row labelled: 4 chunks of exactly 8 rows
    weight.requires_grad_(True)
    spec = LossSpec(kind=kind, beta=0.3, temperature=2.0, alpha=0.5, chunk_size=8)
    with RecordedOps() as recorded:
        output = distillation_loss(hidden, DenseTeacher(teacher), labels, spec, lm_head_weight=weight)
    assert torch.isfinite(output.loss)
    assert not [name for name, _ in recorded.ops if "backward" in name], "autograd ran inside the loss"
    fresh = 0
    for name, made in recorded.ops:
        _, op, overload = name.split(".")
        if not op.endswith("_") and overload != "out":
            fresh += sum(1 for shape, dtype in made if shape == (8, 29) and dtype != torch.bool)
    return fresh / 4


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "skew_kl", "tvd"])
def test_gradient_is_formed_without_autograd_in_a_few_more_buffers_than_forward_kl(kind):
    """No backward kernel runs inside the loss, and a chunk allocates at most four [rows, vocab] tensors more
    than forward KL's closed form (whose count includes the CE, entropy and T != 1 buffers every kind has)."""
    assert fresh_chunk_buffers(kind) <= fresh_chunk_buffers("forward_kl") + 4
