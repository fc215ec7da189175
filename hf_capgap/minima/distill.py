"""The training stages: distil the pruned student, and (``baseline: true``) train the same-size
student from scratch on the same tokens with the same optimizer.

Both run on every process of the launch (DDP / FSDP / ZeRO-3 as accelerate set it up), build their
``TrainingArguments`` only after the teacher is loaded (ZeRO-3 would otherwise partition it), resume
from their last Trainer checkpoint, and publish their model folder in one rename once finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers.utils import logging

from hf_capgap.minima.config import ON_POLICY_TRAINER_FIELDS, TAID_FIELDS, MinimaConfig
from hf_capgap.minima.data import RunData, StreamPasses, on_policy_rows, scratch_rows
from hf_capgap.minima.plan import Plan, row_tokens, run_settings, steps_for
from hf_capgap.utils.artifacts import json_sha256, read_manifest
from hf_capgap.utils.training_arguments import StudentTraining, student_training_arguments

STAGE_KIND = "minima_stage"
FORMAT_VERSION = 1

logger = logging.get_logger(__name__)


def is_main() -> bool:
    from hf_capgap.utils.processes import process_state

    return process_state().is_main_process


def wait() -> None:
    from hf_capgap.utils.processes import process_state

    process_state().wait_for_everyone()


def student_training(config: MinimaConfig, plan: Plan) -> StudentTraining:
    """The optimizer and precision settings both students share, so the comparison is like for like."""
    return StudentTraining(
        steps=steps_for(config, plan),
        batch_size=config.batch_size,
        seq_len=plan.seq_len,
        learning_rate=config.learning_rate,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
    )


def _finished(path: Path, inputs: Mapping[str, Any]) -> bool:
    if not path.exists():
        return False
    read_manifest(path, STAGE_KIND, FORMAT_VERSION, expected={"inputs_sha256": json_sha256(inputs)}, verify_files=True)
    return True


def _stream_passes_callback(passes: StreamPasses) -> Any:
    """A TrainerCallback keeping ``passes.rows_per_pass`` in each checkpoint and restoring it on resume.

    A rerun from the final checkpoint reads no pass of the stream, yet reports the distinct tokens the
    uninterrupted run does. Saved as an ``ExportableState`` in ``trainer_state.json``, which the Trainer
    writes last, so every complete checkpoint holds it. ``unknown`` is set when the rerun starts from a final
    checkpoint saved without it (by a version before the record): nothing then tells whether the stream ran out.
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class StreamPassesState(TrainerCallback, ExportableState):
        unknown = False

        def state(self) -> dict[str, Any]:
            return {"args": {}, "attributes": {"rows_per_pass": passes.rows_per_pass}}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # setdefault: a checkpoint saved without this callback lacks the entry the Trainer's next save updates
            self.unknown = type(self).__name__ not in state.stateful_callbacks and state.global_step >= state.max_steps
            recorded = state.stateful_callbacks.setdefault(type(self).__name__, self.state())
            if recorded["attributes"]["rows_per_pass"] is not None:
                passes.ran_out(recorded["attributes"]["rows_per_pass"])

    return StreamPassesState()


def _train_resumably(
    trainer: Any, checkpoints: Path, final: Path, data: RunData, seq_len: int, fields: Mapping[str, Any]
) -> None:
    """Train from the last complete checkpoint in ``checkpoints``, then publish the model at ``final`` in one rename.

    The manifest records the wall seconds of the training call that finished the stage (a resumed stage
    counts its last attempt only), the tokens trained on and how many were distinct (fewer when a stream ran out
    and was read again), which the results report: None when a rerun from the final checkpoint of a run
    saved before the record cannot know it. Learning it would mean reading the budget's rows of the stream
    again (all of them when it did not run out, the common case) for one report field.
    """
    from hf_capgap.ladder.pretraining import last_complete_checkpoint, train_from
    from hf_capgap.utils.artifacts import write_manifest

    last = last_complete_checkpoint(checkpoints)
    stream_state = None if data.passes is None else _stream_passes_callback(data.passes)
    if stream_state is not None:
        trainer.add_callback(stream_state)
    started = time.perf_counter()
    train_from(trainer, last)
    wall_seconds = time.perf_counter() - started
    resumed_from = None if last is None else last.step
    rows = trainer.state.global_step * trainer.get_total_train_batch_size(trainer.args)
    distinct_rows = rows if data.passes is None else data.passes.distinct_rows(rows)
    distinct_tokens = distinct_rows * seq_len
    if stream_state is not None and stream_state.unknown:
        distinct_tokens = None
        logger.warning(
            f"{last.path} was saved without the record of whether the training stream ran out: "
            f"distinct_train_tokens is unknown (None). Delete {checkpoints} and rerun to measure it."
        )
    staging = final.with_name(f".{final.name}.partial")
    if is_main():
        shutil.rmtree(staging, ignore_errors=True)
    wait()
    trainer.save_model(str(staging))
    if is_main():
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest records the settings
        data.tokenizer.save_pretrained(staging)
        write_manifest(
            staging,
            STAGE_KIND,
            FORMAT_VERSION,
            {
                **fields,
                "steps": trainer.state.global_step,
                "resumed_from_step": resumed_from,
                "wall_seconds": wall_seconds,
                "train_tokens": rows * seq_len,
                "distinct_train_tokens": distinct_tokens,
                "train_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            },
        )
        os.replace(staging, final)
        shutil.rmtree(checkpoints, ignore_errors=True)
    wait()


def stage_record(stage: Path) -> dict[str, Any]:
    """What a finished training stage's manifest records (steps, train_tokens, wall_seconds, losses ...)."""
    return read_manifest(stage, STAGE_KIND, FORMAT_VERSION)


def distinct_train_tokens(stage: Path) -> int | None:
    """Distinct tokens a finished training stage trained on (its train_tokens unless a stream ran short);
    None for a stage finished before the manifest (or its last checkpoint) recorded it."""
    return read_manifest(stage, STAGE_KIND, FORMAT_VERSION).get("distinct_train_tokens")


def _teacher_cache_path(config: MinimaConfig, data: RunData, teacher_id: str) -> Path:
    inputs = [teacher_id, data.identity, config.cache_mode, config.cache_k, config.temperature]
    if config.cache_mode == "sampled":
        inputs.append(config.cache_sampler)
    return config.work_dir / f"cache-{json_sha256(inputs)[:12]}"


def _distill_names(
    config: MinimaConfig, plan: Plan, student_dir: Path, data: RunData, teacher_id: str
) -> tuple[dict, Path, Path]:
    """(inputs, final folder, checkpoint folder) of the distillation of ``student_dir``."""
    inputs = {
        "stage": "distill",
        "student": student_dir.name,
        "teacher": teacher_id,
        "data": data.identity,
        "settings": run_settings(config, plan),
    }
    if config.generates:  # rows of prompt + completion, counted so since issue 22's review (not rows of seq_len)
        inputs["row_tokens"] = row_tokens(config, plan)
    tag = json_sha256(inputs)[:12]
    return inputs, config.work_dir / f"distilled-{tag}", config.work_dir / f"distill-{tag}"


def _distill_arguments(config: MinimaConfig, plan: Plan, checkpoints: Path, cache_path: Path | None) -> Any:
    from hf_capgap.trainer import DistillationConfig

    return student_training_arguments(
        DistillationConfig,
        checkpoints,
        student_training(config, plan),
        save_steps=config.save_steps,
        logging_steps=config.logging_steps,
        loss=config.loss,
        alpha=config.alpha,
        temperature=config.temperature,
        teacher_dtype=config.teacher_dtype,
        teacher_cache=None if cache_path is None else str(cache_path),
        **{name: getattr(config, name) for name in TAID_FIELDS},
        **(on_policy_arguments(config) if config.generates else {}),
    )


def on_policy_arguments(config: MinimaConfig) -> dict[str, Any]:
    """GKD's settings for the trainer, and loss on completion tokens only. Generated rows are labelled on their
    completion by the trainer; rows that keep the dataset's completion (lmbda < 1) mark their prompt in
    ``completion_mask``, which TRL applies only with completion_only_loss (at lmbda 1 the rows are prompts alone,
    which it would drop as unlabelled)."""
    fields = {name: getattr(config, name) for name in ON_POLICY_TRAINER_FIELDS}
    return {**fields, "completion_only_loss": True} if config.lmbda < 1 else fields


def teacher_cache_stage(
    config: MinimaConfig, plan: Plan, teacher: Any, student_dir: Path, data: RunData, teacher_id: str
) -> None:
    """Build (or finish) the TeacherCache the distillation of ``student_dir`` reads (``teacher_cache: true``).

    A stage of its own so the caller can free the teacher before any student trains; nothing runs
    when the distilled student is already finished (fingerprinting the teacher reads every weight).
    """
    inputs, final, checkpoints = _distill_names(config, plan, student_dir, data, teacher_id)
    if not config.teacher_cache or _finished(final, inputs):
        return
    from hf_capgap.cache import TeacherCache

    cache_path = _teacher_cache_path(config, data, teacher_id)
    # Prepared with the trainer's own arguments, so the cached rows are the rows it trains on.
    TeacherCache.build(
        teacher,
        data.train,
        cache_path,
        mode=config.cache_mode,
        k=config.cache_k,
        sampler=config.cache_sampler,
        temperature=config.temperature,
        batch_size=config.eval_batch_size,
        tokenizer=data.tokenizer,
        args=_distill_arguments(config, plan, checkpoints, cache_path),
    )


def distill_stage(
    config: MinimaConfig, plan: Plan, teacher: Any | None, student_dir: Path, data: RunData, teacher_id: str
) -> Path:
    """Distil the student in ``student_dir`` (online teacher or a TeacherCache); resumable; returns its folder.

    With ``teacher_cache`` the teacher may be None once :func:`teacher_cache_stage` built the cache.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from hf_capgap.trainer import DistillationTrainer

    inputs, final, checkpoints = _distill_names(config, plan, student_dir, data, teacher_id)
    if _finished(final, inputs):
        return final
    cache_path = _teacher_cache_path(config, data, teacher_id) if config.teacher_cache else None
    if cache_path is None and teacher is None:
        raise ValueError("distill_stage needs the teacher unless teacher_cache is set.")
    if cache_path is not None and teacher is not None:
        teacher_cache_stage(config, plan, teacher, student_dir, data, teacher_id)
    args = _distill_arguments(config, plan, checkpoints, cache_path)
    trainer = DistillationTrainer(
        # fp32 master weights (bf16 runs through autocast), whatever dtype the pruned folder was saved in
        model=AutoModelForCausalLM.from_pretrained(student_dir, use_safetensors=True, dtype=torch.float32),
        teacher_model=None if cache_path else teacher,
        args=args,
        train_dataset=on_policy_rows(data.train, config) if config.generates else data.train,
        processing_class=data.tokenizer,
        teacher_processing_class=None if cache_path else data.tokenizer,
    )
    tokens = row_tokens(config, plan)
    _train_resumably(trainer, checkpoints, final, data, tokens, {"inputs_sha256": json_sha256(inputs)})
    return final


def _scratch_student(plan: Plan, student_dir: Path) -> str:
    """What the scratch baseline takes from the pruned student: its architecture. A direct run keeps naming the
    pruned folder (the identity it always had); in a chain that folder's name hashes the assistants' training,
    so the architecture alone (config.json without its provenance) names it."""
    if not plan.assistants:
        return student_dir.name
    saved = json.loads((student_dir / "config.json").read_text())
    return json_sha256({k: v for k, v in saved.items() if k not in ("_name_or_path", "transformers_version")})


def scratch_stage(config: MinimaConfig, plan: Plan, student_dir: Path, data: RunData) -> Path:
    """The baseline: the student's architecture from random init, plain CE, same rows and optimizer; when the run
    generates, each row cut to the distilled student's row tokens (prompt + max_completion_length of the corpus),
    so both train on as many tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_capgap.data import make_collator

    inputs = {
        "stage": "scratch",
        "student": _scratch_student(plan, student_dir),
        "data": data.identity,
        "settings": config.result_settings(),  # no assistant fields: the chain does not touch a random init
    }
    if config.generates:
        inputs["row_tokens"] = row_tokens(config, plan)
    tag = json_sha256(inputs)[:12]
    final = config.work_dir / f"scratch-{tag}"
    if _finished(final, inputs):
        return final
    checkpoints = config.work_dir / f"scratch-checkpoints-{tag}"
    args = student_training_arguments(
        TrainingArguments,
        checkpoints,
        student_training(config, plan),
        save_steps=config.save_steps,
        logging_steps=config.logging_steps,
    )
    torch.manual_seed(config.seed)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_dir), dtype=torch.float32),
        args=args,
        train_dataset=scratch_rows(data.train, config),
        data_collator=make_collator(data.tokenizer),
        processing_class=data.tokenizer,
    )
    tokens = row_tokens(config, plan)
    _train_resumably(trainer, checkpoints, final, data, tokens, {"inputs_sha256": json_sha256(inputs)})
    return final
