"""Teacher signals: what the loss knows of the teacher at each student row. Each holds [N, ...] tensors
aligned with the student rows and computes its divergence to a chunk of student logits, with the gradient
written in place (closed forms, no autograd graph): full logits
(online teacher, dense cache), hidden states and lm_head (fused online teacher), top-k + tail buckets or
samples (teacher caches). Only the first two hold the whole distribution that TAID interpolates.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from hf_capgap.errors import ConfigError
from hf_capgap.losses.closed_form import divergence_and_log_q_gradient, into_softmax_gradient_, spread_bucket_gradient_
from hf_capgap.losses.divergence import kl_terms, taid_target
from hf_capgap.losses.spec import LossSpec

SIGNAL_BLOCK_ELEMENTS = 1 << 21  # CPU: teacher log-probs formed per block of this many values (8 MiB fp32)


class _FullDistributionTeacher(abc.ABC):
    """A teacher signal that yields the whole next-token distribution of each row (``log_probs``)."""

    @abc.abstractmethod
    def log_probs(self, vocab: int, temperature: float) -> Tensor:
        """Teacher log-probs at ``temperature`` over the first ``vocab`` tokens: a fresh [rows, vocab] fp32
        buffer that the caller may overwrite."""

    @abc.abstractmethod
    def take(self, index: slice | Tensor) -> _FullDistributionTeacher:
        """The signal of the rows ``index``."""

    def forward_kl_into_gradient_(
        self, log_q: Tensor, temperature: float, scale: float, taid_t: float | None = None
    ) -> Tensor:
        """Sum of KL(p || q) over rows; ``log_q`` is overwritten with ``q - scale * p``.

        The teacher side is formed a block of rows at a time (:func:`block_rows`), so on CPU its
        log-probs and probs add two small blocks to the chunk's memory, not two [chunk, vocab] buffers.
        With ``taid_t``, p is TAID's target p_t (:func:`taid_target`): it carries no gradient, so
        d KL(p_t || q) / d(tempered logits) is q - p_t, the forward-KL form with p_t for p.
        """
        total = log_q.new_zeros(())
        for part, log_p in self._log_prob_blocks(log_q, temperature):
            if taid_t is not None:
                log_p = taid_target(log_q[part], log_p, taid_t)
            p = log_p.exp()
            # Elementwise then a cascade sum: a BLAS dot of p.log_p minus p.log_q cancels badly in fp32. A token
            # the teacher rules out (p == 0, log p = -inf) adds 0, not the NaN of -inf * 0.
            total += log_p.sub_(log_q[part]).mul_(p).masked_fill_(p == 0, 0.0).sum()
            log_q[part].exp_().sub_(p, alpha=scale)
        return total

    def _log_prob_blocks(self, log_q: Tensor, temperature: float) -> Iterator[tuple[slice, Tensor]]:
        """The teacher's tempered log-probs over ``log_q``'s vocabulary, a block of rows at a time."""
        rows, vocab = log_q.shape
        block = block_rows(log_q)
        for start in range(0, rows, block):
            part = slice(start, start + block)
            yield part, (self if block >= rows else self.take(part)).log_probs(vocab, temperature)

    def divergence_into_gradient_(self, log_q: Tensor, temperature: float, scale: float, spec: LossSpec) -> Tensor:
        """Sum of ``spec``'s divergence (not forward KL) over rows; ``log_q`` is overwritten with
        scale * dD/du + (1 - scale) * q (u = tempered logits), by :mod:`hf_capgap.losses.closed_form`.

        Formed a block of rows at a time like :meth:`forward_kl_into_gradient_`: a few block-sized
        teacher buffers on CPU, no [chunk, vocab] autograd graph.
        """
        total = log_q.new_zeros(())
        for part, log_p in self._log_prob_blocks(log_q, temperature):
            values, grad = divergence_and_log_q_gradient(log_p, log_q[part], spec.kind, spec.beta)
            total += values.sum()
            into_softmax_gradient_(log_q[part], grad, scale)
        return total


def block_rows(logits: Tensor) -> int:
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
    side the buckets are exact (no renormalisation); the student's tail bucket is the sum of its
    probabilities outside the teacher's top-k.
    """

    ids: Tensor  # [N, k] long
    logprobs: Tensor  # [N, k] teacher log-probs at the cache temperature
    tail_logprob: Tensor  # [N] log(1 - sum of top-k probs)

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

    def take(self, index: slice | Tensor) -> TopKTeacher:
        return TopKTeacher(self.ids[index], self.logprobs[index], self.tail_logprob[index])

    def _student_buckets_(self, log_q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The student's log-probs at the top-k ids, its probs with the top-k zeroed (``log_q`` overwritten), and
        the log of its tail mass: a plain sum of the off-top-k entries, exact (no 1 - sum(top-k) cancellation)
        with no extra [rows, vocab] buffer, floored so the log stays finite if the top-k hold all the mass."""
        log_q_top = log_q.gather(-1, self.ids)
        q = log_q.exp_().scatter_(-1, self.ids, 0.0)
        return log_q_top, q, q.sum(dim=-1).clamp_(min=torch.finfo(q.dtype).tiny).log_()

    def forward_kl_into_gradient_(self, log_q: Tensor, temperature: float, scale: float) -> Tensor:
        """Sum of the bucketed KL over rows; ``log_q`` is overwritten with ``q - scale * r``.

        The gradient of the k + 1 bucket KL w.r.t. the tempered logits is ``q - r`` with r = p on
        the top-k tokens and r = q * p_tail / q_tail elsewhere: the teacher's tail mass spread over
        the rest of the vocabulary in the student's own proportions.
        """
        log_q_top, q, log_q_tail = self._student_buckets_(log_q)
        log_p_top, log_p_tail = self.logprobs.float(), self.tail_logprob.float()
        total = kl_terms(log_p_top, log_q_top).sum() + kl_terms(log_p_tail, log_q_tail).sum()
        tail_ratio = (log_p_tail - log_q_tail).exp().clamp_(max=1e30)  # finite, so 0 * ratio stays 0
        q.mul_((1.0 - scale * tail_ratio).unsqueeze(-1))
        q.scatter_(-1, self.ids, log_q_top.exp() - scale * log_p_top.exp())
        return total

    def divergence_into_gradient_(self, log_q: Tensor, temperature: float, scale: float, spec: LossSpec) -> Tensor:
        """Sum of ``spec``'s bucketed divergence (not forward KL) over rows; ``log_q`` is overwritten with
        scale * dD/du + (1 - scale) * q. The divergence and its G are formed over the k + 1 buckets only.
        """
        log_q_top, q, log_q_tail = self._student_buckets_(log_q)
        log_q_tail = log_q_tail.unsqueeze(-1)
        log_p = torch.cat([self.logprobs.float(), self.tail_logprob.float().unsqueeze(-1)], dim=-1)
        values, grad = divergence_and_log_q_gradient(
            log_p, torch.cat([log_q_top, log_q_tail], dim=-1), spec.kind, spec.beta
        )
        spread_bucket_gradient_(q, self.ids, log_q_top, log_q_tail, grad, scale)
        return values.sum()


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
            raise ConfigError("SampledTeacher needs exactly one of logprobs (per drawn id) or entropy (per row).")

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

    def forward_kl_into_gradient_(self, log_q: Tensor, temperature: float, scale: float) -> Tensor:
        """Sum of the Monte-Carlo KL over rows; ``log_q`` is overwritten with ``q - scale * p_hat``."""
        counts = self.counts.float()
        weights = counts / counts.sum(dim=-1, keepdim=True)
        total = self._kl_estimate(weights, log_q.gather(-1, self.ids)).sum()
        log_q.exp_().scatter_add_(-1, self.ids, weights.mul_(-scale))  # padding slots add 0
        return total


TeacherSignal = DenseTeacher | FusedTeacher | TopKTeacher | SampledTeacher
