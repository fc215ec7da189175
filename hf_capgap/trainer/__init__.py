"""Distillation training: ``DistillationConfig`` (SFTConfig plus the distillation settings) and
``DistillationTrainer`` (TRL's SFTTrainer with the teacher online or read from a ``TeacherCache``).

Names are imported on first use, so ``hf_capgap.trainer.settings`` (shared by the sweep and MiniMA
configs) imports without torch, transformers or TRL.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DistillationTrainer": "hf_capgap.trainer.trainer",
    "DistillationConfig": "hf_capgap.trainer.config",
    "check_sft_loss_fields": "hf_capgap.trainer.config",
    "DistillationSettings": "hf_capgap.trainer.settings",
    "TeacherCacheSettings": "hf_capgap.trainer.settings",
    "OnPolicySettings": "hf_capgap.trainer.settings",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_capgap.trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
