"""Distillation losses: divergences between teacher and student (forward/reverse KL, JSD ...), the
teacher signals they read (dense, fused, top-k, sampled), the chunked ``distillation_loss``, the fused
lm_head path and the Liger backend. Plain torch: no Trainer needed.
"""

from __future__ import annotations

from hf_capgap.losses.chunked import (
    DIVERGENCES,
    CHUNK_ELEMENTS,
    ACCELERATOR_CHUNK_ROWS,
    SIGNAL_BLOCK_ELEMENTS,
    LOW_PRECISION_MAX_CHUNKS,
    IGNORE_INDEX,
    check_beta,
    bucket_divergence,
    divergence,
    LossSpec,
    DenseTeacher,
    FusedTeacher,
    TopKTeacher,
    SampledTeacher,
    TeacherSignal,
    DistillationLossOutput,
    distillation_loss,
)

__all__ = [
    "DIVERGENCES",
    "CHUNK_ELEMENTS",
    "ACCELERATOR_CHUNK_ROWS",
    "SIGNAL_BLOCK_ELEMENTS",
    "LOW_PRECISION_MAX_CHUNKS",
    "IGNORE_INDEX",
    "check_beta",
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
