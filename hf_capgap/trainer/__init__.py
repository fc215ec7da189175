"""Distillation training: ``DistillationConfig`` (SFTConfig plus the distillation settings) and
``DistillationTrainer`` (TRL's SFTTrainer with the teacher online or read from a ``TeacherCache``).
"""

from __future__ import annotations

from hf_capgap.trainer.trainer import DistillationTrainer
from hf_capgap.trainer.config import DistillationConfig, check_sft_loss_fields

__all__ = [
    "DistillationTrainer",
    "DistillationConfig",
    "check_sft_loss_fields",
]
