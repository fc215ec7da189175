"""The prune stage: one process cuts the student out of the teacher with Taylor importance.

Pruning reads the whole teacher and back-propagates through it, so it runs once, in one process,
before any sharded (ZeRO-3 / FSDP) group exists; a multi-process launch is refused at planning time
and starts from ``student_init`` instead. The pruned folder (safetensors, config, tokenizer,
manifest) is named after its inputs and reused when they match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_capgap.minima.config import MinimaConfig
from hf_capgap.minima.data import RunData
from hf_capgap.minima.plan import Plan
from hf_capgap.utils.artifacts import json_sha256, read_manifest


def refuse_sharded_pruning() -> None:
    """Pruning inside a ZeRO-3 context or a multi-process group would see shards or stall the others."""
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise RuntimeError(
            "pruning must run in one process with no ZeRO-3 context: run `hf-capgap prune` or "
            "`python recipes/minima.py CONFIG --prune_only` first, then launch with --student_init."
        )


def pruned_folder(config: MinimaConfig, plan: Plan, data: RunData, teacher_id: str) -> Path:
    inputs = {
        "teacher": teacher_id,
        "student_params": plan.student_params,
        "shape": plan.student_shape,
        "layer_selection": config.layer_selection,
        "calibration": len(data.calibration),
        "data": data.identity,
    }
    return config.work_dir / f"pruned-{json_sha256(inputs)[:12]}"


def prune_stage(
    config: MinimaConfig, plan: Plan, teacher: Any, data: RunData, teacher_id: str
) -> tuple[Path, dict[str, Any]]:
    """The Taylor-pruned student's folder and manifest, pruned now or reused."""
    from hf_capgap.pruning import FORMAT_VERSION, MANIFEST_KIND, prune_model, save_pruned

    path = pruned_folder(config, plan, data, teacher_id)
    if not path.exists():
        refuse_sharded_pruning()
        student = prune_model(
            teacher,
            target_params=None if plan.student_shape else plan.student_params,
            shape=plan.student_shape,
            calibration=data.calibration,
            layer_selection=config.layer_selection,
            checkpoint_layers=config.gradient_checkpointing,
        )
        save_pruned(
            student,
            path,
            teacher_name=plan.teacher if plan.teacher_kind != "local" else Path(plan.teacher).name,
            tokenizer=data.tokenizer,
        )
        del student
    return path, read_manifest(path, MANIFEST_KIND, FORMAT_VERSION, verify_files=True)
