"""One builder for the ``TrainingArguments`` of every model hf_capgap trains (recipe, baseline, sweep,
ladder teachers).

Distilled student, from-scratch baseline, sweep runs and the ladder's pretraining share optimizer,
precision, accumulation and checkpointing settings through :func:`student_training_arguments`, so
comparisons are like for like and a GPU preset's bf16 / accumulation / activation checkpointing reach
every trainer. It lives in ``utils`` so that ``ladder`` (below ``trainer``) builds its arguments here too.
Building arguments under an accelerate DeepSpeed ZeRO-3 launch registers ZeRO-3 for every model loaded
afterwards: callers load their frozen teacher first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class StudentTraining:
    """The optimization settings a student trains with."""

    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0


def student_training_arguments(
    args_class: type,
    output_dir: str | Path,
    training: StudentTraining,
    *,
    save_steps: int | None,
    logging_steps: int,
    **extra: Any,
) -> Any:
    """``args_class`` (``TrainingArguments`` or ``DistillationConfig``) for ``training``.

    ``save_steps=None`` saves no checkpoints. When the class has TRL's ``max_length`` it is set to the
    sequence length, so TRL never truncates the packed rows to its 1024 default.
    """
    import torch

    from hf_capgap.utils.processes import use_cpu

    fields = {item.name for item in dataclasses.fields(args_class)}
    if "max_length" in fields:
        extra.setdefault("max_length", training.seq_len)
    if save_steps is not None:
        extra.update(save_strategy="steps", save_steps=save_steps, save_total_limit=1)
    else:
        extra.update(save_strategy="no")
    return args_class(
        output_dir=str(output_dir),
        max_steps=training.steps,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=int(training.warmup_ratio * training.steps),
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        max_grad_norm=training.max_grad_norm,
        bf16=training.bf16,
        activation_checkpointing=training.gradient_checkpointing,
        logging_steps=logging_steps,
        eval_strategy="no",
        report_to="none",
        seed=training.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=use_cpu(),
        **extra,
    )


def evaluation_arguments(output_dir: str | Path, *, batch_size: int, bf16: bool) -> Any:
    """Arguments for ``Trainer.evaluate`` on every process (loss only, nothing saved or reported)."""
    import torch
    from transformers import TrainingArguments

    from hf_capgap.utils.processes import use_cpu

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_eval_batch_size=batch_size,
        bf16=bf16,
        prediction_loss_only=True,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=use_cpu(),
        disable_tqdm=True,
    )
