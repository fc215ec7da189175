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
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
CHUNK_ELEMENTS = 1 << 22  # CPU: logits per automatic chunk, 16 MiB in fp32 (128 rows at a 32000 vocabulary)
ACCELERATOR_CHUNK_ROWS = (256, 2048)  # accelerators: H / 4 rows per automatic chunk, within these bounds
SIGNAL_BLOCK_ELEMENTS = 1 << 21  # CPU: teacher log-probs formed per block of this many values (8 MiB fp32)
# A bf16 / fp16 lm_head gradient summed over at most this many chunks stays in its dtype: measured on CPU
# (bench/bench_losses.py), 8 bf16 additions give 2.1x the error of one bf16 rounding, 32 give 4.1x, 64 5.7x.
LOW_PRECISION_MAX_CHUNKS = 8
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
    chunk_size: int | None = None  # rows per chunk; None: automatic, by vocabulary, hidden size and device
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

    def rows_per_chunk(self, vocab: int, hidden: int | None = None, device: torch.device | str | None = None) -> int:
        """Rows per chunk: the explicit ``chunk_size``, else :meth:`automatic_rows`."""
        if self.chunk_size is not None:
            return self.chunk_size
        return self.automatic_rows(vocab, hidden, device)

    @staticmethod
    def automatic_rows(vocab: int, hidden: int | None = None, device: torch.device | str | None = None) -> int:
        """Rows per chunk for a [vocab, hidden] lm_head (``hidden`` None: logits input) on ``device``.

        CPU: the power of two that keeps one [rows, vocab] fp32 buffer near CHUNK_ELEMENTS; the loss
        holds about three such buffers, whatever the vocabulary (measured, bench/results/losses.md).
        Accelerators: each fused chunk re-reads the [V, H] weight and read-modify-writes its
        gradient (about 3 V H elements moved) for 6 rows V H flops, so at least 256 rows keep the
        matmuls above a current GPU's flop-per-byte ridge, and H / 4 rows keep the chunk's fp32
        [rows, V] buffers within one [V, H] fp32 gradient. Derived, not yet measured on a GPU:
        bench/gpu_check.py sweeps it.
        """
        if device is None or torch.device(device).type == "cpu":
            return 1 << max(4, (CHUNK_ELEMENTS // vocab).bit_length() - 1)
        low, high = ACCELERATOR_CHUNK_ROWS
        return 1 << (min(max((hidden or 0) // 4, low), high).bit_length() - 1)


# ----------------------------------------------------------------------------------------------
# Teacher signals. Each holds [N, ...] tensors aligned with the student rows and knows how to
# compute its divergence to a chunk of student logits.
# ----------------------------------------------------------------------------------------------


class _FullDistributionTeacher(abc.ABC):
    """A teacher signal that yields the whole next-token distribution of each row (``log_probs``)."""

    @abc.abstractmethod
    def log_probs(self, vocab: int, temperature: float) -> Tensor:
        """Teacher log-probs at ``temperature`` over the first ``vocab`` tokens: a fresh [rows, vocab] fp32
        buffer that the caller may overwrite."""

    def divergence(self, student_logits: Tensor, spec: LossSpec) -> Tensor:
        vocab = student_logits.shape[-1]
        log_q = F.log_softmax(student_logits / spec.temperature, dim=-1)
        return bucket_divergence(self.log_probs(vocab, spec.temperature), log_q, spec.kind, spec.beta)

    @abc.abstractmethod
    def take(self, index: slice | Tensor) -> _FullDistributionTeacher:
        """The signal of the rows ``index``."""

    def forward_kl_into_gradient_(self, log_q: Tensor, temperature: float, scale: float) -> Tensor:
        """Sum of KL(p || q) over rows; ``log_q`` is overwritten with ``q - scale * p``.

        The teacher side is formed a block of rows at a time (:func:`_block_rows`), so on CPU its
        log-probs and probs add two small blocks to the chunk's memory, not two [chunk, vocab] buffers.
        """
        rows, vocab = log_q.shape
        block = _block_rows(log_q)
        total = log_q.new_zeros(())
        for start in range(0, rows, block):
            part = slice(start, start + block)
            log_p = (self if block >= rows else self.take(part)).log_probs(vocab, temperature)
            p = log_p.exp()
            # Elementwise then a cascade sum: a BLAS dot of p.log_p minus p.log_q cancels badly in fp32.
            total += log_p.sub_(log_q[part]).mul_(p).sum()
            log_q[part].exp_().sub_(p, alpha=scale)
        return total


def _block_rows(logits: Tensor) -> int:
    """Rows per elementwise block of a [rows, vocab] chunk: about SIGNAL_BLOCK_ELEMENTS values on CPU, where
    memory is what the blocks save; the whole chunk on accelerators, where kernel launches cost more."""
    rows, vocab = logits.shape
    return max(1, SIGNAL_BLOCK_ELEMENTS // vocab) if logits.device.type == "cpu" else max(rows, 1)


@dataclass(frozen=True)
class DenseTeacher(_FullDistributionTeacher):
    """Full teacher logits [N, V] (online teacher), or log-probs already at temperature (dense cache)."""

    logits: Tensor
    tempered_logprobs: bool = False

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    def take(self, index: slice | Tensor) -> DenseTeacher:
        return replace(self, logits=self.logits[index])

    def log_probs(self, vocab: int, temperature: float) -> Tensor:
        if self.tempered_logprobs:
            return self.logits[:, :vocab].to(torch.float32, copy=True)
        values = self.logits[:, :vocab].float()
        return F.log_softmax(values / temperature if temperature != 1.0 else values, dim=-1)


@dataclass(frozen=True)
class FusedTeacher(_FullDistributionTeacher):
    """Teacher last hidden states [N, H] and lm_head: teacher logits are built one chunk at a time."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

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

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

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
    The gradient needs only ids and counts; the value also needs the teacher's side, either the
    log-probs of the drawn ids or, as a teacher cache stores it (2 bytes per position instead of 2 per
    id), the teacher's entropy H(p): KL = -H(p) - E_p[log q], estimated by -H(p) - sum_j (c_j / k) log q(x_j).
    """

    ids: Tensor  # [N, k] long; padding slots have count 0
    counts: Tensor  # [N, k]
    logprobs: Tensor | None = None  # [N, k] teacher log-probs of ids at the cache temperature
    entropy: Tensor | None = None  # [N] teacher entropy at the cache temperature

    def __post_init__(self) -> None:
        if (self.logprobs is None) == (self.entropy is None):
            raise ValueError("SampledTeacher needs exactly one of logprobs (per drawn id) or entropy (per row).")

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

    def take(self, index: slice | Tensor) -> SampledTeacher:
        def rows(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[index]

        return SampledTeacher(self.ids[index], self.counts[index], rows(self.logprobs), rows(self.entropy))

    def _kl_estimate(self, weights: Tensor, log_q_drawn: Tensor) -> Tensor:
        """Per-row Monte-Carlo KL(p || q); padding slots (weight 0) contribute nothing."""
        if self.logprobs is not None:
            terms = weights * (self.logprobs.float() - log_q_drawn)
            return torch.where(weights > 0, terms, torch.zeros_like(terms)).sum(dim=-1)
        cross = torch.where(weights > 0, weights * log_q_drawn, torch.zeros_like(log_q_drawn)).sum(dim=-1)
        return -self.entropy.float() - cross

    def divergence(self, student_logits: Tensor, spec: LossSpec) -> Tensor:
        if spec.kind != "forward_kl":
            raise ValueError(
                f"a sampled teacher cache estimates forward_kl only; got loss={spec.kind!r}. "
                "Use loss='forward_kl', or build the cache with mode='topk' or 'dense'."
            )
        log_q = F.log_softmax(student_logits / spec.temperature, dim=-1).gather(-1, self.ids)
        counts = self.counts.float()
        return self._kl_estimate(counts / counts.sum(dim=-1, keepdim=True), log_q)

    def forward_kl_into_gradient_(self, log_q: Tensor, temperature: float, scale: float) -> Tensor:
        """Sum of the Monte-Carlo KL over rows; ``log_q`` is overwritten with ``q - scale * p_hat``."""
        counts = self.counts.float()
        weights = counts / counts.sum(dim=-1, keepdim=True)
        total = self._kl_estimate(weights, log_q.gather(-1, self.ids)).sum()
        log_q.exp_().scatter_add_(-1, self.ids, weights.mul_(-scale))  # padding slots add 0
        return total


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
    # sums over positions of the student's entropy (at T = 1) and of argmax == label: SFTTrainer's
    # `entropy` and `mean_token_accuracy`; None where the loss does not compute them
    entropy_sum: Tensor | None = None
    num_correct: Tensor | None = None


def _token_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of the entropy of softmax(logits), count of argmax == label) over a chunk's rows.

    Read before the loss overwrites the chunk, a block of rows at a time (:func:`_block_rows`), so the
    probabilities add one small block to the chunk's memory. H = logsumexp(z) - sum softmax(z) z.
    """
    block = _block_rows(logits)
    entropy = logits.new_zeros(())
    for start in range(0, logits.shape[0], block):
        z = logits[start : start + block]
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        entropy += (lse.squeeze(-1) - (z - lse).exp_().mul_(z).sum(dim=-1)).sum()
    return entropy, (logits.argmax(dim=-1) == labels).sum().float()


def _log_softmax_(logits: Tensor) -> Tensor:
    """log_softmax over the last dim, written into contiguous ``logits`` on CPU (no [rows, vocab] temporary:
    the CPU kernel reads each row before writing it); a new buffer elsewhere, where that is not checked."""
    if logits.device.type == "cpu" and logits.is_contiguous():
        return torch._log_softmax(logits, -1, False, out=logits)
    return F.log_softmax(logits, dim=-1)


def _forward_kl_chunk(
    logits: Tensor, teacher: TeacherSignal | None, labels: Tensor, spec: LossSpec, owned: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed form of :func:`_chunk_loss_and_grad` for forward KL, for every kind of teacher signal.

    d(T^2 KL(p || softmax(z / T)))/dz = T (q - r) (r = p for a full teacher; see each signal's
    ``forward_kl_into_gradient_``) and d CE/dz = softmax(z) - onehot, computed in place so a chunk
    needs one to three [chunk, vocab] buffers instead of the autograd graph's dozen. ``owned`` logits
    (a buffer nothing else reads) are overwritten at T = 1.
    """
    temperature, alpha = spec.temperature, spec.alpha
    zero = logits.new_zeros(())
    if temperature == 1.0 and owned:
        log_q = _log_softmax_(logits)
    else:
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
    logits: Tensor, teacher: TeacherSignal | None, labels: Tensor, spec: LossSpec, owned: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(sum of T^2 * D, sum of CE, d(alpha * T^2 * D + (1 - alpha) * CE)/d logits) for one chunk.

    ``teacher`` is None only when alpha == 0 (cross-entropy alone). Forward KL has a closed form;
    the other divergences differentiate the readable formula with autograd, one chunk at a time.
    """
    if teacher is None or spec.kind == "forward_kl":
        return _forward_kl_chunk(logits, teacher, labels, spec, owned)
    logits = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        distill, ce = _chunk_values(logits, teacher, labels, spec, owned=False)
        total = spec.alpha * distill + (1.0 - spec.alpha) * ce
    (grad,) = torch.autograd.grad(total, logits)
    return distill.detach(), ce.detach(), grad


def _chunk_values(
    logits: Tensor, teacher: TeacherSignal | None, labels: Tensor, spec: LossSpec, owned: bool
) -> tuple[Tensor, Tensor]:
    """(sum of T^2 * D, sum of CE) for one chunk by the same formulas as training, without gradients."""
    if teacher is None or spec.kind == "forward_kl":
        distill, ce, _ = _forward_kl_chunk(logits, teacher, labels, spec, owned)
        return distill, ce
    zero = logits.new_zeros(())
    distill = teacher.divergence(logits, spec).sum() * spec.temperature**2 if spec.alpha > 0 else zero
    ce = F.cross_entropy(logits, labels, reduction="sum") if spec.alpha < 1 else zero
    return distill, ce


@dataclass(frozen=True)
class _Rows:
    """The labelled student rows, and where each chunk finds its teacher rows.

    The loss runs over labelled rows only, gathered chunk by chunk (no [N, V] compacted copy). A
    teacher signal either has one row per student row or, as a teacher cache stores it, one row per
    labelled row (``compacted``).
    """

    valid: Tensor  # [N] bool
    valid_index: Tensor | None  # positions of labelled rows; None when every row is labelled
    num_valid: int
    compacted: bool

    @classmethod
    def of(cls, labels: Tensor, teacher_rows: int | None) -> _Rows:
        valid = labels != IGNORE_INDEX
        num_valid = int(valid.sum())
        if teacher_rows not in (None, labels.shape[0], num_valid):
            raise ValueError(
                f"the teacher signal has {teacher_rows} rows; expected one per student row ({labels.shape[0]}) "
                f"or one per labelled row ({num_valid})."
            )
        all_valid = num_valid == labels.shape[0]
        index = None if all_valid else valid.nonzero().squeeze(-1)
        return cls(valid, index, num_valid, compacted=not all_valid and teacher_rows == num_valid)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[slice | Tensor, slice | Tensor]]:
        """(student rows, teacher rows) of each chunk: slices when every row is labelled."""
        for start in range(0, self.num_valid, chunk_rows):
            positions = slice(start, start + chunk_rows)
            if self.valid_index is None:
                yield positions, positions
            else:
                student_rows = self.valid_index[positions]
                yield student_rows, positions if self.compacted else student_rows


@dataclass
class _Gradients:
    """Buffers the chunk loop fills with d(summed loss)/d(input); None where no gradient is needed."""

    student: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def allocate(
        cls, student: Tensor, weight: Tensor | None, bias: Tensor | None, rows: _Rows, needs: tuple[bool, ...],
        inplace: bool, shape: _ChunkShape,
    ) -> _Gradients:
        """Zeroed where a chunk never writes (unlabelled rows, padded vocabulary columns)."""
        vocab = shape.vocab
        partial = rows.valid_index is not None or (weight is None and vocab < student.shape[-1])
        student_grad = None
        if needs[0]:
            student_grad = student if inplace else (torch.zeros_like if partial else torch.empty_like)(student)
        weight_grad = None
        if weight is not None and needs[1]:
            num_chunks = math.ceil(rows.num_valid / shape.rows)
            weight_grad = torch.zeros(weight.shape, dtype=_weight_grad_dtype(weight, num_chunks), device=weight.device)
        bias_grad = None
        if bias is not None and needs[2]:
            bias_grad = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        return cls(student_grad, weight_grad, bias_grad)

    def finish_inplace_(self, student: Tensor, rows: _Rows, vocab: int) -> None:
        """Zero what no chunk wrote when the student logits hold their own gradient."""
        if self.student is not student:
            return
        student[:, vocab:] = 0
        if rows.valid_index is not None:
            student[~rows.valid] = 0


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of the lm_head matmuls: autocast's where it is on for the weight's device, else the weight's."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def _weight_grad_dtype(weight: Tensor, num_chunks: int) -> torch.dtype:
    """fp32, except for a low-precision weight whose gradient sums few chunks: that weight's ``.grad`` is
    rounded to its dtype anyway, and a few more roundings stay near that error (measured in
    bench/bench_losses.py); accumulating in the weight's dtype halves the [V, H] traffic per chunk."""
    if weight.dtype == torch.float32 or num_chunks > LOW_PRECISION_MAX_CHUNKS:
        return torch.float32
    return weight.dtype


@dataclass(frozen=True)
class _ChunkShape:
    """The real vocabulary (columns past it are padding) and the rows of each chunk."""

    vocab: int
    rows: int

    @classmethod
    def of(cls, student: Tensor, weight: Tensor | None, spec: LossSpec) -> _ChunkShape:
        fused = weight is not None
        vocab = spec.vocab_size or (weight.shape[0] if fused else student.shape[-1])
        return cls(vocab, spec.rows_per_chunk(vocab, student.shape[-1] if fused else None, student.device))


def _chunked_sums(
    student: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    teacher: TeacherSignal | None,
    labels: Tensor,
    spec: LossSpec,
    rows: _Rows,
    grads: _Gradients | None,
    inplace: bool,
    shape: _ChunkShape,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums over labelled rows of T^2 * D, of CE, of the student's entropy and of correct argmaxes,
    chunk by chunk; fills ``grads`` when given.

    Fused (``weight`` given): each chunk's logits are built from hidden states in the compute dtype
    (tensor cores under bf16 / fp16) and dropped after their gradient has been multiplied back.
    """
    fused, vocab = weight is not None, shape.vocab
    if fused:
        compute = _compute_dtype(weight)
        head_weight = weight[:vocab].to(compute)
        head_bias = None if bias is None else bias[:vocab].to(compute)
    distill_sum = student.new_zeros((), dtype=torch.float32)
    ce_sum = student.new_zeros((), dtype=torch.float32)
    entropy_sum = student.new_zeros((), dtype=torch.float32)
    num_correct = student.new_zeros((), dtype=torch.float32)
    for student_rows, teacher_rows in rows.chunks(shape.rows):
        chunk = student[student_rows]
        if fused:
            chunk = chunk.to(compute)
            logits = F.linear(chunk, head_weight, head_bias)
        else:
            logits = chunk[:, :vocab]
        owned = fused or inplace or isinstance(student_rows, Tensor) or logits.dtype != torch.float32
        logits = logits.float()
        chunk_teacher = None if teacher is None else teacher.take(teacher_rows)
        chunk_labels = labels[student_rows]
        entropy, correct = _token_stats(logits, chunk_labels)
        entropy_sum += entropy
        num_correct += correct
        if grads is None:
            distill, ce = _chunk_values(logits, chunk_teacher, chunk_labels, spec, owned)
        else:
            distill, ce, grad = _chunk_loss_and_grad(logits, chunk_teacher, chunk_labels, spec, owned)
            if fused:
                _add_head_gradients_(grads, grad, chunk, head_weight, student_rows, vocab)
            elif grads.student is not None:
                grads.student[student_rows, :vocab] = grad.to(grads.student.dtype)
        distill_sum += distill
        ce_sum += ce
    return distill_sum, ce_sum, entropy_sum, num_correct


def _add_head_gradients_(
    grads: _Gradients, grad_logits: Tensor, chunk: Tensor, head_weight: Tensor, rows: slice | Tensor, vocab: int
) -> None:
    """Multiply one chunk's logit gradient back through the lm_head: hidden rows, weight and bias."""
    if grads.bias is not None:
        grads.bias[:vocab].add_(grad_logits.sum(dim=0))
    grad_logits = grad_logits.to(head_weight.dtype)
    if grads.student is not None:
        grads.student[rows] = (grad_logits @ head_weight).to(grads.student.dtype)
    if grads.weight is not None:  # in place: no [V, H] temporary when the buffer has the matmul's dtype
        target = grads.weight[:vocab]
        if target.dtype == chunk.dtype:
            target.addmm_(grad_logits.t(), chunk)
        else:
            target.add_(grad_logits.t() @ chunk)


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
        teacher: TeacherSignal | None,
        labels: Tensor,
        spec: LossSpec,
        rows: _Rows,
        normalizer: float,
        inplace_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        shape = _ChunkShape.of(student, weight, spec)
        inplace = inplace_grad and weight is None
        grads = _Gradients.allocate(student, weight, bias, rows, ctx.needs_input_grad, inplace, shape)
        sums = _chunked_sums(student, weight, bias, teacher, labels, spec, rows, grads, inplace, shape)
        distill_sum, ce_sum = sums[:2]
        grads.finish_inplace_(student, rows, shape.vocab)
        loss = (spec.alpha * distill_sum + (1.0 - spec.alpha) * ce_sum) / normalizer
        # An attribute, not save_for_backward: the buffers are neither inputs nor outputs, and with no
        # other reference left, backward hands them to autograd without a defensive [V, H] copy.
        ctx.grads, ctx.normalizer = grads, normalizer
        ctx.mark_non_differentiable(*sums)
        return (loss, *sums)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        scale = grad_loss / ctx.normalizer
        scaled = [None if g is None else g.mul_(scale.to(g.dtype)) for g in (grads.student, grads.weight, grads.bias)]
        del grads
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None, None


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
    ``labels`` [N] are aligned with the rows; rows labelled -100 are skipped. ``teacher`` has one row
    per student row, or one per labelled row (a teacher cache stores only those). The sum is divided
    by ``num_items_in_batch`` when given (the token count of the whole accumulated batch, which makes
    gradient accumulation exact) and otherwise by the number of labelled rows (at least 1). The
    output also carries the student's entropy and argmax-accuracy sums over the labelled rows (the
    metrics SFTTrainer logs), read from each chunk's logits so no full logits are formed for them.

    A micro-batch with no labelled row gives loss 0 whose backward still reaches the inputs and the
    lm_head with exact zeros, so every DDP rank sees every parameter and steps. Without grad mode (or
    with no input requiring grad), only values are computed: no gradient buffer, no gradient matmul.
    ``inplace_grad`` lets the logits buffer be reused for its own gradient; pass it only for a tensor
    nothing else reads.
    """
    if student.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student.shape[0]:
        raise ValueError(
            f"expected student [N, V or H] and labels [N], got {tuple(student.shape)} and {tuple(labels.shape)}."
        )
    if teacher is None and spec.alpha > 0:
        raise ValueError(f"no teacher signal was given but alpha={spec.alpha}: the distillation term needs one.")
    rows = _Rows.of(labels, None if teacher is None else teacher.num_rows)
    normalizer = max(float(num_items_in_batch) if num_items_in_batch is not None else float(rows.num_valid), 1.0)
    inputs = (student, lm_head_weight, lm_head_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        loss, *sums = _ChunkedDistillation.apply(
            student, lm_head_weight, lm_head_bias, teacher, labels, spec, rows, normalizer, inplace_grad
        )
    else:
        shape = _ChunkShape.of(student, lm_head_weight, spec)
        sums = _chunked_sums(
            student, lm_head_weight, lm_head_bias, teacher, labels, spec, rows, None, inplace_grad, shape
        )
        loss = (spec.alpha * sums[0] + (1.0 - spec.alpha) * sums[1]) / normalizer
    return DistillationLossOutput(loss, *sums[:2], rows.num_valid, *sums[2:])
