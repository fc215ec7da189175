"""Distillation losses: divergences between teacher and student (forward/reverse KL, JSD ..., TAID), the
teacher signals they read (dense, fused, top-k, sampled), the chunked ``distillation_loss`` and its
``LossSpec``, the fused lm_head path and the Liger backend. Plain torch: no Trainer needed.
"""

from __future__ import annotations

from hf_capgap.losses.chunked import LOW_PRECISION_MAX_CHUNKS, DistillationLossOutput, distillation_loss
from hf_capgap.losses.divergence import (
    DIVERGENCES,
    IGNORE_INDEX,
    LOSSES,
    TAID,
    bucket_divergence,
    check_beta,
    check_taid_t,
    divergence,
)
from hf_capgap.losses.signals import (
    SIGNAL_BLOCK_ELEMENTS,
    DenseTeacher,
    FusedTeacher,
    SampledTeacher,
    TeacherSignal,
    TopKTeacher,
)
from hf_capgap.losses.spec import ACCELERATOR_CHUNK_ROWS, CHUNK_ELEMENTS, LossSpec

__all__ = [
    "DIVERGENCES",
    "LOSSES",
    "TAID",
    "CHUNK_ELEMENTS",
    "ACCELERATOR_CHUNK_ROWS",
    "SIGNAL_BLOCK_ELEMENTS",
    "LOW_PRECISION_MAX_CHUNKS",
    "IGNORE_INDEX",
    "check_beta",
    "check_taid_t",
    "bucket_divergence",
    "divergence",
    "LossSpec",
    "DenseTeacher",
    "FusedTeacher",
    "TopKTeacher",
    "SampledTeacher",
    "TeacherSignal",
    "DistillationLossOutput",
    "distillation_loss",
]
