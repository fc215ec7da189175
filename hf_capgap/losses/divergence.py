"""Divergences between teacher and student next-token distributions (forward / reverse KL, JSD, skew KL, TVD),
and TAID's forward KL to an interpolated target.

All of them work on the last dimension of two log-distributions over the same support, so the top-k case
of a teacher cache is the same formula applied to k + 1 buckets (the top-k tokens and the rest).
:func:`divergence` is the readable dense reference the chunked loss is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hf_capgap.errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
# TAID (Shing et al., ICLR 2025): KL(p_t || q) to a target that moves from the student towards the teacher.
# It needs the teacher's whole distribution and the trainer's schedule of t, so it is offered apart.
TAID = "taid"
LOSSES = (*DIVERGENCES, TAID)
IGNORE_INDEX = -100


def check_beta(kind: str, beta: float) -> None:
    """Raise if ``beta`` is outside the range where ``kind`` is defined."""
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ConfigError(f"beta must be in (0, 1) for loss='jsd' (teacher weight of the mixture), got {beta}.")
    if kind == "skew_kl" and not 0.0 <= beta < 1.0:
        raise ConfigError(f"beta must be in [0, 1) for loss='skew_kl' (skew of the mixture), got {beta}.")


def check_taid_t(taid_t: float | None) -> float:
    """``taid_t``, refused unless it is an interpolation weight in [0, 1]."""
    if taid_t is None or not 0.0 <= taid_t <= 1.0:
        raise ConfigError(f"loss='taid' needs its interpolation weight taid_t in [0, 1], got {taid_t}.")
    return taid_t


def taid_target(log_q: Tensor, log_p: Tensor, taid_t: float) -> Tensor:
    """TAID's target log p_t = log_softmax((1 - t) * stopgrad(student logits) + t * teacher logits).

    Log-probs differ from logits (at the same temperature) by one constant per row, which the softmax
    drops, so the student and teacher log-probs interpolate exactly as their logits would. ``log_p`` (a
    teacher buffer, no gradient) is overwritten.
    """
    return F.log_softmax(log_p.mul_(taid_t).add_(log_q.detach(), alpha=1.0 - taid_t), dim=-1)


def kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
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
        terms = kl_terms(log_p, log_q)
    elif kind == "reverse_kl":
        terms = kl_terms(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * kl_terms(log_p, log_m) + (1.0 - beta) * kl_terms(log_q, log_m)
    elif kind == "skew_kl":
        terms = kl_terms(log_p, _log_mixture(log_p, log_q, beta))
    elif kind == "tvd":
        terms = 0.5 * (log_p.exp() - log_q.exp()).abs()
    else:
        raise ConfigError(f"unknown divergence kind={kind!r}; choose one of {', '.join(DIVERGENCES)}.")
    return terms.sum(dim=-1)


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    taid_t: float | None = None,
) -> Tensor:
    """Reference distillation divergence, scaled by T^2, averaged over positions whose label is not -100.

    ``labels`` are already aligned with the logits (position i of the logits predicts ``labels[i]``).
    Both logits are divided by ``temperature`` before the softmax; multiplying by T^2 keeps gradient
    magnitudes comparable across temperatures (Hinton et al., 2015). ``kind="taid"`` is KL(p_t || q)
    with p_t = softmax(((1 - t) * stopgrad(student logits) + t * teacher logits) / T), t = ``taid_t``.
    """
    check_beta(kind, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ."
        )
    valid = labels != IGNORE_INDEX
    if not valid.any():
        raise ConfigError("every label is -100: there is no position to distill on.")
    log_q = F.log_softmax(student_logits[valid].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)
    if kind == TAID:
        student_tempered = student_logits[valid].float().detach() / temperature
        target = (1.0 - check_taid_t(taid_t)) * student_tempered + taid_t * teacher_logits[valid].float() / temperature
        return bucket_divergence(F.log_softmax(target, dim=-1), log_q, "forward_kl").mean() * temperature**2
    return bucket_divergence(log_p, log_q, kind, beta).mean() * temperature**2
