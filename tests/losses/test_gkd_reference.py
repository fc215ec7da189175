"""Our chunked loss against TRL's ``GKDTrainer.generalized_jsd_loss`` on the same logits: value and gradient.

How the two correspond (read from trl 1.16's source, checked here):

- **beta.** TRL's ``beta`` is the teacher's weight in the mixture m = beta * p_teacher + (1 - beta) * q_student,
  and its loss is beta * KL(p || m) + (1 - beta) * KL(q || m); beta = 0 is forward KL(p || q), beta = 1 is
  reverse KL(q || p). Our ``jsd`` ``beta`` is the same teacher weight, so TRL beta b in (0, 1) is our
  ``LossSpec("jsd", beta=b)``; b = 0 is our ``forward_kl`` and b = 1 our ``reverse_kl``.
- **temperature.** Both divide both logits by T before the softmax; we multiply the divergence by T^2
  (Hinton et al.), TRL does not. So ours = T^2 * TRL's. (``GKDTrainer.compute_loss`` does not even pass its
  ``temperature`` to this function: its training loss is always at T = 1, its temperature only samples.)
- **normalisation.** TRL's ``reduction="batchmean"`` divides the masked sum by the number of labels != -100;
  ours divides by ``num_items_in_batch`` when given, else by the number of labelled rows. Without
  ``num_items_in_batch`` both are the mean over labelled positions; with the same ``num_items_in_batch`` both
  are sum / num_items_in_batch.
- **labels.** TRL's function takes labels already shifted to the logits (``compute_loss`` slices
  ``logits[:, :-1]`` and ``labels[:, 1:]`` before calling it), as ours does: row i of the logits predicts
  ``labels[i]``. So both receive the same aligned [batch, seq] batch, ours flattened to [tokens].
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_capgap.losses import DenseTeacher, FusedTeacher, LossSpec, distillation_loss

gkd = pytest.importorskip("trl.experimental.gkd")

BATCH, SEQ, VOCAB, HIDDEN = 2, 7, 37, 12
CHUNK = 3  # rows per chunk, fewer than the 14 tokens of the batch
TRL_BETAS = (0.0, 1.0, 0.5, 0.1, 0.9)
TOLERANCE = 1e-5


def our_spec(trl_beta: float, temperature: float) -> LossSpec:
    """The LossSpec that computes T^2 times TRL's generalized JSD at ``trl_beta`` (see the module docstring)."""
    if trl_beta == 0.0:
        return LossSpec("forward_kl", temperature=temperature, alpha=1.0, chunk_size=CHUNK)
    if trl_beta == 1.0:
        return LossSpec("reverse_kl", temperature=temperature, alpha=1.0, chunk_size=CHUNK)
    return LossSpec("jsd", beta=trl_beta, temperature=temperature, alpha=1.0, chunk_size=CHUNK)


def make_batch():
    """Student hidden states and lm_head, teacher hidden states and lm_head, shifted labels with -100s."""
    generator = torch.Generator().manual_seed(7)
    student_hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    student_weight = torch.randn(VOCAB, HIDDEN, generator=generator) / math.sqrt(HIDDEN)
    teacher_hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    teacher_weight = 2 * torch.randn(VOCAB, HIDDEN, generator=generator) / math.sqrt(HIDDEN)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels[0, :2] = -100  # a prompt
    labels[1, :4] = -100  # a longer prompt
    labels[1, -1] = -100  # padding after EOS
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def trl_loss_and_grads(trl_beta, temperature, num_items_in_batch=None):
    """TRL's loss on the same logits, and its gradients w.r.t. the student logits, hidden states and lm_head."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_batch()
    student_hidden.requires_grad_(True)
    student_weight.requires_grad_(True)
    student_logits = student_hidden @ student_weight.T
    student_logits.retain_grad()
    loss = gkd.GKDTrainer.generalized_jsd_loss(
        student_logits,
        teacher_hidden @ teacher_weight.T,
        labels=labels,
        beta=trl_beta,
        temperature=temperature,
        reduction="batchmean",
        num_items_in_batch=num_items_in_batch,
    )
    loss.backward()
    return loss.detach(), student_logits.grad, student_hidden.grad, student_weight.grad


def assert_close(ours, trl_value, label):
    difference = (ours - trl_value).abs().max().item()
    assert difference <= TOLERANCE, f"{label}: max |ours - T^2 * TRL| = {difference:.2e}"


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("trl_beta", TRL_BETAS)
def test_dense_logits_match_trl(trl_beta, temperature):
    trl_value, trl_grad_logits, _, _ = trl_loss_and_grads(trl_beta, temperature)
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_batch()
    student_logits = (student_hidden @ student_weight.T).reshape(-1, VOCAB).requires_grad_(True)
    teacher = DenseTeacher((teacher_hidden @ teacher_weight.T).reshape(-1, VOCAB))
    out = distillation_loss(student_logits, teacher, labels.reshape(-1), our_spec(trl_beta, temperature))
    out.loss.backward()
    scale = temperature**2
    assert out.num_tokens == int((labels != -100).sum())
    assert_close(out.loss, scale * trl_value, "loss")
    assert_close(student_logits.grad, scale * trl_grad_logits.reshape(-1, VOCAB), "d loss / d student logits")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("trl_beta", TRL_BETAS)
def test_fused_lm_head_matches_trl(trl_beta, temperature):
    """Student hidden states + lm_head and a FusedTeacher: no [tokens, vocab] logits passed in at all."""
    trl_value, _, trl_grad_hidden, trl_grad_weight = trl_loss_and_grads(trl_beta, temperature)
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_batch()
    hidden = student_hidden.reshape(-1, HIDDEN).requires_grad_(True)
    weight = student_weight.requires_grad_(True)
    teacher = FusedTeacher(teacher_hidden.reshape(-1, HIDDEN), teacher_weight)
    spec = our_spec(trl_beta, temperature)
    out = distillation_loss(hidden, teacher, labels.reshape(-1), spec, lm_head_weight=weight)
    out.loss.backward()
    scale = temperature**2
    assert_close(out.loss, scale * trl_value, "loss")
    assert_close(hidden.grad, scale * trl_grad_hidden.reshape(-1, HIDDEN), "d loss / d student hidden")
    assert_close(weight.grad, scale * trl_grad_weight, "d loss / d student lm_head")


@pytest.mark.parametrize("trl_beta", [0.0, 0.5, 1.0])
def test_num_items_in_batch_normalises_alike(trl_beta):
    """Under gradient accumulation both divide the masked sum by the same num_items_in_batch."""
    num_items = 23
    trl_value, trl_grad_logits, _, _ = trl_loss_and_grads(trl_beta, 1.0, num_items_in_batch=num_items)
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_batch()
    student_logits = (student_hidden @ student_weight.T).reshape(-1, VOCAB).requires_grad_(True)
    teacher = DenseTeacher((teacher_hidden @ teacher_weight.T).reshape(-1, VOCAB))
    spec = our_spec(trl_beta, 1.0)
    out = distillation_loss(student_logits, teacher, labels.reshape(-1), spec, num_items_in_batch=num_items)
    out.loss.backward()
    assert (labels != -100).sum() != num_items  # so the normaliser is really the one given
    assert_close(out.loss, trl_value, "loss")
    assert_close(student_logits.grad, trl_grad_logits.reshape(-1, VOCAB), "d loss / d student logits")
