"""Closed-form gradients of the divergences other than forward KL, for the chunked loss.

Each divergence D(p, q) with q = softmax(u) (u the tempered student logits) has
dD/du_j = G_j - q_j * sum_i G_i, where G = dD/d(log q) elementwise on the support. On a full vocabulary
G is a [rows, vocab] block; on a top-k cache's k + 1 buckets (top-k tokens and the tail) the same G is
taken over the buckets and spread back over the tokens (:func:`spread_bucket_gradient_`). Writing G by
hand, with in-place ops on buffers the caller hands over, keeps a block at about three buffers where
autograd through :func:`hf_capgap.losses.divergence.bucket_divergence` holds a dozen. The values and the
``-inf`` handling follow that reference (0 where the first distribution of a KL term is 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hf_capgap.errors import ConfigError

CLOSED_FORM_DIVERGENCES = ("reverse_kl", "jsd", "skew_kl", "tvd")
RATIO_LIMIT = 1e30  # bound on G_tail / q_tail when the student's tail mass is at its floor: 0 * it stays 0


def divergence_and_log_q_gradient(log_p: Tensor, log_q: Tensor, kind: str, beta: float) -> tuple[Tensor, Tensor]:
    """(D per row, G = dD/d(log q)) for teacher ``log_p`` and student ``log_q`` along the last dim.

    G may differ from the true derivative by a multiple of q, which the softmax's projection removes
    (reverse KL's ``+ q`` is dropped). ``log_p`` must be a buffer the caller no longer needs: it is
    overwritten; ``log_q`` is only read.
    """
    if kind == "reverse_kl":
        return _reverse_kl(log_p, log_q)
    if kind == "jsd":
        return _jsd(log_p, log_q, beta)
    if kind == "skew_kl":
        return _skew_kl(log_p, log_q, beta)
    if kind == "tvd":
        return _tvd(log_p, log_q)
    raise ConfigError(f"no closed form for kind={kind!r} here; choose one of {', '.join(CLOSED_FORM_DIVERGENCES)}.")


def _reverse_kl(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """KL(q || p); G = q (log q - log p)."""
    grad = log_p.neg_().add_(log_q).masked_fill_(log_q == -math.inf, 0.0).mul_(log_q.exp())
    return grad.sum(dim=-1), grad


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """log(beta p + (1 - beta) q) in a new buffer (``log_q`` itself, unchanged, when beta == 0)."""
    if beta == 0.0:
        return log_q
    log_m = log_q + math.log1p(-beta)
    return torch.logaddexp(log_p + math.log(beta), log_m, out=log_m)


def _teacher_kl_terms_(log_p: Tensor, log_m: Tensor) -> Tensor:
    """Row sums of p (log p - log m), 0 where p == 0; ``log_p`` is overwritten."""
    is_zero = log_p == -math.inf
    p = log_p.exp()
    return log_p.sub_(log_m).mul_(p).masked_fill_(is_zero, 0.0).sum(dim=-1)


def _jsd(log_p: Tensor, log_q: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; G = (1 - beta) q (log q - log m)."""
    log_m = _log_mixture(log_p, log_q, beta)
    teacher = _teacher_kl_terms_(log_p, log_m)
    grad = log_m.neg_().add_(log_q).masked_fill_(log_q == -math.inf, 0.0).mul_(torch.exp(log_q, out=log_p))
    student = grad.sum(dim=-1)
    return teacher.mul_(beta).add_(student, alpha=1.0 - beta), grad.mul_(1.0 - beta)


def _skew_kl(log_p: Tensor, log_q: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """KL(p || m), m = beta p + (1 - beta) q; G = -p w with w = (1 - beta) q / m, formed in log space."""
    log_w = log_q + math.log1p(-beta)
    log_m = _log_mixture(log_p, log_q, beta)
    p = log_p.exp()
    values = _teacher_kl_terms_(log_p, log_m)
    # p == 0 gives 0, also where q == 0 too (exp(-inf - -inf) is NaN, and a NaN would reach the whole row).
    return values, log_w.sub_(log_m).exp_().mul_(p).masked_fill_(p == 0, 0.0).neg_()


def _tvd(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """(1/2) sum |p - q|; G = q sign(q - p) / 2, the subgradient autograd takes (0 where p == q)."""
    q = log_q.exp()
    diff = log_p.exp_().neg_().add_(q)
    values = diff.abs().sum(dim=-1).mul_(0.5)
    return values, diff.sign_().mul_(q).mul_(0.5)


def into_softmax_gradient_(log_q: Tensor, grad: Tensor, scale: float) -> None:
    """Overwrite ``log_q`` with scale * dD/du + (1 - scale) * q, where dD/du = G - q * sum(G) (full vocabulary).

    The (1 - scale) q part is the cross-entropy's softmax at T = 1 (see the chunked loss), as in the
    forward-KL closed form's q - scale * p.
    """
    total = grad.sum(dim=-1, keepdim=True)
    log_q.exp_().mul_(total.mul_(-scale).add_(1.0 - scale)).add_(grad, alpha=scale)


def spread_bucket_gradient_(
    q: Tensor, ids: Tensor, log_q_top: Tensor, log_q_tail: Tensor, grad: Tensor, scale: float
) -> None:
    """Write scale * dD/du + (1 - scale) * q into ``q`` for a divergence over k + 1 buckets.

    ``q`` holds the student's probabilities with its top-k ``ids`` zeroed; ``grad`` [rows, k + 1] is G over
    the buckets (tail last). A token j in bucket b gets dD/du_j = G_b q_j / q_b - q_j sum(G): G_j itself
    for a top-k token, q_j G_tail / q_tail for the rest.
    """
    total = grad.sum(dim=-1, keepdim=True)
    tail_ratio = (grad[:, -1:] / log_q_tail.exp()).clamp_(-RATIO_LIMIT, RATIO_LIMIT)
    q.mul_(tail_ratio.sub_(total).mul_(scale).add_(1.0 - scale))
    q_top = log_q_top.exp()
    top = grad[:, :-1].sub(q_top * total).mul_(scale).add_(q_top, alpha=1.0 - scale)
    q.scatter_(-1, ids, top)
