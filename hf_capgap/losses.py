"""Divergences between teacher and student next-token distributions, dense and sparse.

Plain torch, importable without the Trainer. Two entry points:

* :func:`divergence` is the readable dense reference: full log-softmax of both sides, one formula.
* :func:`distillation_loss` is what the trainer runs: the same values and gradients, computed chunk
  by chunk inside one autograd Function so that no [tokens, vocab] intermediate outlives its chunk.
  Given last hidden states and the lm_head weight it never materialises the student logits at all.
  It also takes sparse teacher signals from a teacher cache: {top-k + tail} buckets, or samples.

All divergences work on the last dimension of two log-distributions over the same support, so the
top-k case is the same formula applied to k + 1 buckets (the top-k tokens and the rest).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
CHUNK_ELEMENTS = 1 << 22  # logits per automatic chunk: 16 MiB in fp32 (128 rows at a 32000 vocabulary)
IGNORE_INDEX = -100


def check_beta(kind: str, beta: float) -> None:
    """Raise if ``beta`` is outside the range where ``kind`` is defined."""
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for loss='jsd' (teacher weight of the mixture), got {beta}.")
    if kind == "skew_kl" and not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1) for loss='skew_kl' (skew of the mixture), got {beta}.")


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a * (log a - log b), with 0 where a == 0 (so -inf log-probs give 0, not NaN)."""
    return torch.where(log_a == -math.inf, torch.zeros_like(log_a), log_a.exp() * (log_a - log_b))


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed in log space."""
    if weight_p == 0.0:
        return log_q
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def bucket_divergence(log_p: Tensor, log_q: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Divergence between teacher ``log_p`` and student ``log_q`` along the last dim, one value per row."""
    if kind == "forward_kl":
        terms = _kl_terms(log_p, log_q)
    elif kind == "reverse_kl":
        terms = _kl_terms(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    elif kind == "skew_kl":
        terms = _kl_terms(log_p, _log_mixture(log_p, log_q, beta))
    elif kind == "tvd":
        terms = 0.5 * (log_p.exp() - log_q.exp()).abs()
    else:
        raise ValueError(f"unknown divergence kind={kind!r}; choose one of {', '.join(DIVERGENCES)}.")
    return terms.sum(dim=-1)


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Reference distillation divergence, scaled by T^2, averaged over positions whose label is not -100.

    ``labels`` are already aligned with the logits (position i of the logits predicts ``labels[i]``).
    Both logits are divided by ``temperature`` before the softmax; multiplying by T^2 keeps gradient
    magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    check_beta(kind, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ."
        )
    valid = labels != IGNORE_INDEX
    if not valid.any():
        raise ValueError("every label is -100: there is no position to distill on.")
    log_q = F.log_softmax(student_logits[valid].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)
    return bucket_divergence(log_p, log_q, kind, beta).mean() * temperature**2


@dataclass(frozen=True)
class LossSpec:
    """What :func:`distillation_loss` computes: alpha * T^2 * D(teacher, student) + (1 - alpha) * CE."""

    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.5
    chunk_size: int | None = None  # rows per chunk; None sizes chunks to CHUNK_ELEMENTS logits
    vocab_size: int | None = None  # real vocabulary: columns past it (padding) are ignored

    def __post_init__(self) -> None:
        if self.kind not in DIVERGENCES:
            raise ValueError(f"kind={self.kind!r} is not one of {', '.join(DIVERGENCES)}.")
        check_beta(self.kind, self.beta)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {self.chunk_size}.")

    def rows_per_chunk(self, vocab: int) -> int:
        """Explicit ``chunk_size``, or the power of two that keeps one [rows, vocab] fp32 buffer near
        CHUNK_ELEMENTS: the loss holds about four such buffers at a time, whatever the vocabulary."""
        if self.chunk_size is not None:
            return self.chunk_size
        return 1 << max(4, (CHUNK_ELEMENTS // vocab).bit_length() - 1)


# ----------------------------------------------------------------------------------------------
# Teacher signals. Each holds [N, ...] tensors aligned with the student rows and knows how to
# compute its divergence to a chunk of student logits.
# ----------------------------------------------------------------------------------------------


class _FullDistributionTeacher(abc.ABC):
    """A teacher signal that yields the whole next-token distribution of each row (``log_probs``)."""

    @abc.abstractmethod
    def log_probs(self, vocab: int, temperature: float) -> Tensor:
        """Teacher log-probs at ``temperature`` over the first ``vocab`` tokens, [rows, vocab] fp32."""

    def divergence(self, student_logits: Tensor, spec: LossSpec) -> Tensor:
        vocab = student_logits.shape[-1]
        log_q = F.log_softmax(student_logits / spec.temperature, dim=-1)
        return bucket_divergence(self.log_probs(vocab, spec.temperature), log_q, spec.kind, spec.beta)

    def forward_kl_into_gradient_(self, log_q: Tensor, temperature: float, scale: float) -> Tensor:
        """Sum of KL(p || q) over rows; ``log_q`` is overwritten with ``q - scale * p``."""
        log_p = self.log_probs(log_q.shape[-1], temperature)
        p = log_p.exp()
        # Elementwise then a cascade sum: a BLAS dot of p.log_p minus p.log_q cancels badly in fp32.
        total = (log_p - log_q).mul_(p).sum()
        log_q.exp_().sub_(p, alpha=scale)
        return total


@dataclass(frozen=True)
class DenseTeacher(_FullDistributionTeacher):
    """Full teacher logits [N, V] (online teacher), or log-probs already at temperature (dense cache)."""

    logits: Tensor
    tempered_logprobs: bool = False

    def take(self, index: slice | Tensor) -> DenseTeacher:
        return replace(self, logits=self.logits[index])

    def log_probs(self, vocab: int, temperature: float) -> Tensor:
        values = self.logits[:, :vocab].float()
        if self.tempered_logprobs:
            return values
        return F.log_softmax(values / temperature if temperature != 1.0 else values, dim=-1)


@dataclass(frozen=True)
class FusedTeacher(_FullDistributionTeacher):
    """Teacher last hidden states [N, H] and lm_head: teacher logits are built one chunk at a time."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def take(self, index: slice | Tensor) -> FusedTeacher:
        return replace(self, hidden=self.hidden[index])

    def log_probs(self, vocab: int, temperature: float) -> Tensor:
        logits = F.linear(self.hidden, self.weight[:vocab], None if self.bias is None else self.bias[:vocab])
        return DenseTeacher(logits).log_probs(vocab, temperature)


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher's k most likely tokens per position and the log of the remaining mass (tail).

    The divergence is taken over k + 1 buckets: each top-k token, and everything else. On the teacher
    side the buckets are exact (no renormalisation); the student's tail bucket is the log-sum-exp of
    its log-probs outside the teacher's top-k.
    """

    ids: Tensor  # [N, k] long
    logprobs: Tensor  # [N, k] teacher log-probs at the cache temperature
    tail_logprob: Tensor  # [N] log(1 - sum of top-k probs)

    def take(self, index: slice | Tensor) -> TopKTeacher:
        return TopKTeacher(self.ids[index], self.logprobs[index], self.tail_logprob[index])

    def divergence(self, student_logits: Tensor, spec: LossSpec) -> Tensor:
        log_q = F.log_softmax(student_logits / spec.temperature, dim=-1)
        log_q_top = log_q.gather(-1, self.ids)
        # A huge finite fill instead of -inf keeps the tail (and its gradient) finite when the top-k
        # covers the whole vocabulary.
        outside = log_q.scatter(-1, self.ids, torch.finfo(log_q.dtype).min / 2)
        log_q_tail = torch.logsumexp(outside, dim=-1, keepdim=True)
        log_p = torch.cat([self.logprobs.float(), self.tail_logprob.float().unsqueeze(-1)], dim=-1)
        return bucket_divergence(log_p, torch.cat([log_q_top, log_q_tail], dim=-1), spec.kind, spec.beta)

    def forward_kl_into_gradient_(self, log_q: Tensor, temperature: float, scale: float) -> Tensor:
        """Sum of the bucketed KL over rows; ``log_q`` is overwritten with ``q - scale * r``.

        The gradient of the k + 1 bucket KL w.r.t. the tempered logits is ``q - r`` with r = p on
        the top-k tokens and r = q * p_tail / q_tail elsewhere: the teacher's tail mass spread over
        the rest of the vocabulary in the student's own proportions.
        """
        log_q_top = log_q.gather(-1, self.ids)
        q = log_q.exp_().scatter_(-1, self.ids, 0.0)
        # A plain sum of the off-top-k entries: exact (no 1 - sum(top-k) cancellation) and no extra
        # [rows, vocab] buffer. The floor keeps the log finite if the top-k hold all the student's mass.
        log_q_tail = q.sum(dim=-1).clamp_(min=torch.finfo(q.dtype).tiny).log_()
        log_p_top, log_p_tail = self.logprobs.float(), self.tail_logprob.float()
        total = _kl_terms(log_p_top, log_q_top).sum() + _kl_terms(log_p_tail, log_q_tail).sum()
        tail_ratio = (log_p_tail - log_q_tail).exp().clamp_(max=1e30)  # finite, so 0 * ratio stays 0
        q.mul_((1.0 - scale * tail_ratio).unsqueeze(-1))
        q.scatter_(-1, self.ids, log_q_top.exp() - scale * log_p_top.exp())
        return total


@dataclass(frozen=True)
class SampledTeacher:
    """k draws (with replacement) from the teacher per position, stored as unique ids with counts.

    The Monte-Carlo forward KL  sum_j (c_j / k) (log p(x_j) - log q(x_j))  is an unbiased estimate of
    KL(p || q), and its gradient  (q - p_hat) / T  an unbiased estimate of the true gradient (q - p) / T.
    """

    ids: Tensor  # [N, k] long; padding slots have count 0
    counts: Tensor  # [N, k]
    logprobs: Tensor  # [N, k] teacher log-probs of ids at the cache temperature

    def take(self, index: slice | Tensor) -> SampledTeacher:
        return SampledTeacher(self.ids[index], self.counts[index], self.logprobs[index])

    def divergence(self, student_logits: Tensor, spec: LossSpec) -> Tensor:
        if spec.kind != "forward_kl":
            raise ValueError(
                f"a sampled teacher cache estimates forward_kl only; got loss={spec.kind!r}. "
                "Use loss='forward_kl', or build the cache with mode='topk' or 'dense'."
            )
        log_q = F.log_softmax(student_logits / spec.temperature, dim=-1).gather(-1, self.ids)
        counts = self.counts.float()
        weights = counts / counts.sum(dim=-1, keepdim=True)
        terms = torch.where(weights > 0, weights * (self.logprobs.float() - log_q), torch.zeros_like(log_q))
        return terms.sum(dim=-1)

    def forward_kl_into_gradient_(self, log_q: Tensor, temperature: float, scale: float) -> Tensor:
        """Sum of the Monte-Carlo KL over rows; ``log_q`` is overwritten with ``q - scale * p_hat``."""
        counts = self.counts.float()
        weights = counts / counts.sum(dim=-1, keepdim=True)
        log_q_drawn = log_q.gather(-1, self.ids)
        terms = torch.where(weights > 0, weights * (self.logprobs.float() - log_q_drawn), torch.zeros_like(weights))
        log_q.exp_().scatter_add_(-1, self.ids, weights.mul_(-scale))  # padding slots add 0
        return terms.sum()


TeacherSignal = DenseTeacher | FusedTeacher | TopKTeacher | SampledTeacher


# ----------------------------------------------------------------------------------------------
# Chunked loss
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillationLossOutput:
    """``loss`` is differentiable; the parts are detached sums for logging."""

    loss: Tensor
    distill_sum: Tensor  # sum over positions of T^2 * D
    ce_sum: Tensor  # sum over positions of the LM cross-entropy
    num_tokens: int


def _forward_kl_chunk(
    logits: Tensor, teacher: TeacherSignal | None, labels: Tensor, spec: LossSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed form of :func:`_chunk_loss_and_grad` for forward KL, for every kind of teacher signal.

    d(T^2 KL(p || softmax(z / T)))/dz = T (q - r) (r = p for a full teacher; see each signal's
    ``forward_kl_into_gradient_``) and d CE/dz = softmax(z) - onehot, computed in place so a chunk
    needs about four [chunk, vocab] buffers instead of the autograd graph's dozen.
    """
    temperature, alpha = spec.temperature, spec.alpha
    zero = logits.new_zeros(())
    log_q = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    ce = zero
    if alpha < 1:
        ce = -log_q[rows, labels].sum() if temperature == 1.0 else F.cross_entropy(logits, labels, reduction="sum")
    distill = zero
    # At T = 1, softmax(z) == q, so alpha (q - r) + (1 - alpha) (q - onehot) = q - alpha r - (1 - alpha) onehot.
    # Otherwise the distillation part alpha T (q - r) is formed first and softmax(z) added after.
    scale = alpha if temperature == 1.0 else 1.0
    if teacher is not None and alpha > 0:
        distill = teacher.forward_kl_into_gradient_(log_q, temperature, scale) * temperature**2
        grad = log_q
    else:
        grad = log_q.exp_()
    if temperature != 1.0:
        grad.mul_(alpha * temperature)
        if alpha < 1:
            grad.add_(F.softmax(logits, dim=-1), alpha=1.0 - alpha)
    if alpha < 1:
        grad[rows, labels] -= 1.0 - alpha
    return distill, ce, grad


def _chunk_loss_and_grad(
    logits: Tensor, teacher: TeacherSignal | None, labels: Tensor, spec: LossSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """(sum of T^2 * D, sum of CE, d(alpha * T^2 * D + (1 - alpha) * CE)/d logits) for one chunk.

    ``teacher`` is None only when alpha == 0 (cross-entropy alone). Forward KL has a closed form;
    the other divergences differentiate the readable formula with autograd, one chunk at a time.
    """
    if teacher is None or spec.kind == "forward_kl":
        return _forward_kl_chunk(logits, teacher, labels, spec)
    logits = logits.detach().requires_grad_(True)
    zero = logits.new_zeros(())
    with torch.enable_grad():
        distill = teacher.divergence(logits, spec).sum() * spec.temperature**2 if spec.alpha > 0 else zero
        ce = F.cross_entropy(logits, labels, reduction="sum") if spec.alpha < 1 else zero
        total = spec.alpha * distill + (1.0 - spec.alpha) * ce
    (grad,) = torch.autograd.grad(total, logits)
    return distill.detach(), ce.detach(), grad


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and gradient computed together, chunk by chunk, in the forward pass.

    Only the gradient w.r.t. the input (logits [N, V], or hidden [N, H] plus lm_head weight) is kept;
    every [chunk, vocab] intermediate is freed before the next chunk. ``backward`` only rescales.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        teacher: TeacherSignal,
        labels: Tensor,
        spec: LossSpec,
        normalizer: float,
        inplace_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        fused = weight is not None
        vocab = spec.vocab_size or (weight.shape[0] if fused else student.shape[-1])
        grad_student = student if inplace_grad and not fused else torch.empty_like(student)
        needs_weight_grad = fused and weight.requires_grad
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight_grad else None
        needs_bias_grad = bias is not None and bias.requires_grad
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias_grad else None
        distill_sum = student.new_zeros((), dtype=torch.float32)
        ce_sum = student.new_zeros((), dtype=torch.float32)
        chunk_rows = spec.rows_per_chunk(vocab)
        for start in range(0, student.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = student[rows]
            if fused:
                logits = F.linear(chunk, weight[:vocab], None if bias is None else bias[:vocab])
            else:
                logits = chunk[:, :vocab]
            chunk_teacher = None if teacher is None else teacher.take(rows)
            distill, ce, grad = _chunk_loss_and_grad(logits.float(), chunk_teacher, labels[rows], spec)
            distill_sum += distill
            ce_sum += ce
            if fused:
                grad_student[rows] = grad.to(weight.dtype) @ weight[:vocab]
                if grad_weight is not None:  # accumulate in place: no [V, H] temporary per chunk
                    grad_weight[:vocab].addmm_(grad.t(), chunk.float())
                if grad_bias is not None:
                    grad_bias[:vocab].add_(grad.sum(dim=0))
            else:
                grad_student[rows, :vocab] = grad
                grad_student[rows, vocab:] = 0
        loss = (spec.alpha * distill_sum + (1.0 - spec.alpha) * ce_sum) / normalizer
        ctx.save_for_backward(grad_student, grad_weight, grad_bias)
        ctx.normalizer = normalizer
        ctx.mark_non_differentiable(distill_sum, ce_sum)
        return loss, distill_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor):  # type: ignore[override]
        grad_student, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss / ctx.normalizer
        grads = [grad_student.mul_(scale.to(grad_student.dtype))]
        for grad, needed in ((grad_weight, ctx.needs_input_grad[1]), (grad_bias, ctx.needs_input_grad[2])):
            grads.append(grad.mul_(scale) if grad is not None and needed else None)
        return grads[0], grads[1], grads[2], None, None, None, None, None


def distillation_loss(
    student: Tensor,
    teacher: TeacherSignal | None,
    labels: Tensor,
    spec: LossSpec,
    *,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
    inplace_grad: bool = False,
) -> DistillationLossOutput:
    """alpha * T^2 * D(teacher || student) + (1 - alpha) * CE, summed over labelled rows / normaliser.

    ``student`` is either logits [N, V] or, with ``lm_head_weight`` [V, H], last hidden states [N, H].
    ``labels`` [N] are aligned with the rows; rows labelled -100 are skipped. The sum is divided by
    ``num_items_in_batch`` when given (the token count of the whole accumulated batch, which makes
    gradient accumulation exact) and otherwise by the number of labelled rows. ``inplace_grad`` lets
    the logits buffer be reused for its own gradient; only pass it for a tensor nothing else reads.
    """
    if student.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student.shape[0]:
        raise ValueError(
            f"expected student [N, V or H] and labels [N], got {tuple(student.shape)} and {tuple(labels.shape)}."
        )
    if teacher is None and spec.alpha > 0:
        raise ValueError(f"no teacher signal was given but alpha={spec.alpha}: the distillation term needs one.")
    valid = labels != IGNORE_INDEX
    num_tokens = int(valid.sum())
    if num_tokens == 0:
        raise ValueError(
            "every label in the batch is -100: there is no position to train on. Check the collator "
            "(labels must be input_ids with padding masked) and drop empty rows from the dataset."
        )
    if num_tokens < labels.shape[0]:
        student, labels = student[valid], labels[valid]
        teacher = None if teacher is None else teacher.take(valid)
        inplace_grad = True  # the boolean-index copy belongs to us
    normalizer = float(num_items_in_batch) if num_items_in_batch is not None else float(num_tokens)
    loss, distill_sum, ce_sum = _ChunkedDistillation.apply(
        student, lm_head_weight, lm_head_bias, teacher, labels, spec, normalizer, inplace_grad
    )
    return DistillationLossOutput(loss, distill_sum, ce_sum, num_tokens)
