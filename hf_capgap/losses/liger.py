"""Optional loss backend: Liger-Kernel's fused linear JSD, for comparing against hf_capgap's own loss.

``loss_backend="liger"`` runs the dense online case (student hidden states and lm_head, teacher hidden
states and lm_head) through ``liger_kernel.transformers.LigerFusedLinearJSD`` (generalized JSD;
beta 0 is forward KL, beta 1 reverse KL) plus ``LigerFusedLinearCrossEntropyLoss`` for the CE part.
liger-kernel is never a dependency of hf_capgap: it is imported only here, only when asked for,
and it needs a CUDA GPU (Triton kernels).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from hf_capgap.errors import ConfigError
from hf_capgap.losses.chunked import DistillationLossOutput
from hf_capgap.losses.signals import FusedTeacher, TeacherSignal
from hf_capgap.losses.spec import LossSpec

LOSS_BACKENDS = ("hf_capgap", "liger")
# Liger's generalized JSD weight of the teacher (JSD_b = b KL(P||M) + (1-b) KL(Q||M), M = b P + (1-b) Q).
LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def require_liger() -> None:
    """Raise, saying how to fix it, unless liger-kernel is importable and a CUDA GPU is visible."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError(
            "loss_backend='liger' needs liger-kernel, which is not installed: `pip install liger-kernel` "
            "(optional), or keep the default loss_backend='hf_capgap'."
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "loss_backend='liger' runs Liger's Triton kernels, which need a CUDA GPU, and none is visible; "
            "use loss_backend='hf_capgap' on this machine."
        )


def liger_unsupported(spec: LossSpec, teacher: TeacherSignal | None, fused: bool, bias: Tensor | None) -> str | None:
    """Why Liger cannot run this case (None when it can): it covers the dense online, fused case only
    (and cross-entropy alone, alpha = 0, as on evaluation rows without a teacher signal)."""
    if spec.kind not in (*LIGER_BETA, "jsd"):
        return f"loss={spec.kind!r} (Liger computes forward_kl, reverse_kl and jsd)"
    if spec.alpha > 0 and not isinstance(teacher, FusedTeacher):
        return "the teacher signal is not an online teacher's hidden states and lm_head (cached or logits signals)"
    if not fused:
        return "the student's lm_head is not fused (sharded or non-fusable head)"
    if bias is not None or getattr(teacher, "bias", None) is not None:
        return "an lm_head has a bias (Liger's fused linear JSD takes weights only)"
    return None


def liger_distillation_loss(
    student: Tensor,
    teacher: FusedTeacher | None,
    labels: Tensor,
    spec: LossSpec,
    *,
    lm_head_weight: Tensor,
    num_items_in_batch: int | Tensor | None = None,
) -> DistillationLossOutput:
    """:func:`hf_capgap.losses.distillation_loss` for the dense online fused case, computed by Liger.

    Same objective and normalisation: alpha * T^2 * D + (1 - alpha) * CE summed over labelled rows,
    divided by ``num_items_in_batch`` (else by the labelled rows). Liger averages over labelled rows,
    so its mean is multiplied back to a sum.
    """
    require_liger()
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    vocab = spec.vocab_size or lm_head_weight.shape[0]
    num_tokens = int((labels != -100).sum())
    normalizer = max(float(num_items_in_batch) if num_items_in_batch is not None else float(num_tokens), 1.0)
    zero = student.new_zeros((), dtype=torch.float32)
    distill_sum, ce_sum = zero, zero
    if spec.alpha > 0 and num_tokens > 0:
        jsd = LigerFusedLinearJSD(jsd_beta=LIGER_BETA.get(spec.kind, spec.beta), temperature=spec.temperature)
        mean = jsd(student, lm_head_weight[:vocab], teacher.hidden, teacher.weight[:vocab], labels)
        distill_sum = mean.float() * num_tokens * spec.temperature**2
    if spec.alpha < 1:
        cross_entropy = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        ce_sum = cross_entropy(lm_head_weight[:vocab], student, labels).float()
    loss = (spec.alpha * distill_sum + (1.0 - spec.alpha) * ce_sum) / normalizer
    if num_tokens == 0:  # exact zeros still reach the student and its head (every DDP rank steps)
        loss = loss + 0.0 * (student.sum() + lm_head_weight.sum())
    return DistillationLossOutput(loss, distill_sum.detach(), ce_sum.detach(), num_tokens)


def liger_loss_on_head(
    rows: Tensor,
    teacher: TeacherSignal | None,
    labels: Tensor,
    spec: LossSpec,
    head: nn.Linear | None,
    num_items_in_batch: Tensor | int | None,
) -> DistillationLossOutput:
    """:func:`liger_distillation_loss` on the student's fused ``head`` (None: not fused), refused with the
    reason for a case Liger does not cover (``loss_backend='liger'``)."""
    reason = liger_unsupported(spec, teacher, fused=head is not None, bias=None if head is None else head.bias)
    if reason is not None:
        raise ConfigError(f"loss_backend='liger' cannot compute this loss: {reason}. Use loss_backend='hf_capgap'.")
    return liger_distillation_loss(
        rows, teacher, labels, spec, lm_head_weight=head.weight, num_items_in_batch=num_items_in_batch
    )
