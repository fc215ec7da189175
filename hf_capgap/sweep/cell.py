"""One cell of the sweep: prune a teacher to a student size, distil it on the shared token budget, evaluate it.

The grid (run.py), its teacher assistants (assistants.py, an assistant is a cell whose student is the
assistant's size) and :func:`hf_capgap.sweep.run_cell` all train through :func:`distill_cell`, so a direct
cell, a chained cell and an assistant differ only in their teacher and budget.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_capgap.sweep.config import ON_POLICY_TRAINER_FIELDS, TAID_FIELDS, SweepConfig
from hf_capgap.sweep.ledger import SCRATCH_PREFIX
from hf_capgap.utils.parameters import count_model_parameters


def distill_cell(
    student_params: int,
    teacher: Any,
    cache_path: Path | None,
    data: dict[str, Any],
    tokenizer: Any,
    config: SweepConfig,
) -> tuple[Any, dict[str, Any]]:
    """Prune ``teacher`` to ``student_params``, distil it from ``teacher`` (or its cache) on ``data['train']``
    for ``config.steps`` steps, and evaluate it: the student and what was measured.

    On-policy (``config.generates``) the student trains on :func:`on_policy_rows` of ``data['train']`` from the
    online teacher, and the record adds the mean generated ``completion_length``; the held-out loss is the
    off-policy cells' (the same packed rows)."""
    import torch

    from hf_capgap.pruning import prune_model
    from hf_capgap.trainer import DistillationConfig, DistillationTrainer
    from hf_capgap.utils.training_arguments import student_training_arguments

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    student = prune_model(
        teacher,
        target_params=student_params,
        calibration=data["calibration"],
        checkpoint_layers=config.gradient_checkpointing,
    )
    student = student.float()  # fp32 master weights under bf16 mixed precision, whatever the teacher's dtype
    pruned_eval = evaluate_loss(student, data["eval"], config.batch_size)
    steps = config.steps
    taid = {name: getattr(config, name) for name in TAID_FIELDS} if config.loss == "taid" else {}
    on_policy = {name: getattr(config, name) for name in ON_POLICY_TRAINER_FIELDS} if config.generates else {}
    if config.generates and config.lmbda < 1:  # rows keeping a completion: loss on their completion_mask alone
        on_policy["completion_only_loss"] = True  # (generated rows are labelled so by the trainer; lmbda 1: prompts)
    train = on_policy_rows(data["train"], config) if config.generates else data["train"]
    with scratch_dir(Path(config.output_dir)) as work_dir:
        args = student_training_arguments(
            DistillationConfig,
            work_dir,
            student_training(config),
            save_steps=None,
            logging_steps=max(1, steps // 4),
            loss=config.loss,
            alpha=config.alpha,
            temperature=config.temperature,
            teacher_cache=None if cache_path is None else str(cache_path),
            disable_tqdm=True,
            **taid,
            **on_policy,
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=None if cache_path is not None else teacher,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
        )
        trainer.train()
    final = evaluate_student(student, data["eval"], config.batch_size)
    generated = _mean_logged(trainer.state.log_history, "completion_length") if config.generates else None
    return student, {
        "student_target": student_params,
        "student_params": count_model_parameters(student),
        "tokens": steps * config.tokens_per_step,
        "pruned_eval_loss": pruned_eval,
        "eval_loss": final["eval_loss"],
        "perplexity": final["perplexity"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        **({} if generated is None else {"completion_length": generated}),
    }


def on_policy_rows(rows: Any, config: SweepConfig) -> Any:
    """The on-policy rows of the packed training ``rows`` (same rows, same order): each row's first
    ``prompt_tokens`` tokens as its prompt, alone when every micro-batch generates (lmbda = 1: prompt-only rows),
    else with the row's next ``max_completion_length`` tokens as the completion (pre-tokenized rows whose
    ``completion_mask`` marks where the prompt ends)."""
    from hf_capgap.data import prompt_completion_rows

    return prompt_completion_rows(rows, config.prompt_tokens, config.dataset_completion_length)


def _mean_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return round(sum(values) / len(values), 2) if values else None


def build_cache(teacher: Any, train: Any, path: Path, config: SweepConfig, tokenizer: Any, progress: bool) -> None:
    """One cache per teacher, of the rows exactly as every student's trainer prepares them."""
    from hf_capgap.cache import TeacherCache
    from hf_capgap.trainer import DistillationConfig
    from hf_capgap.utils.training_arguments import student_training_arguments

    data_args = student_training_arguments(
        DistillationConfig,
        path,
        student_training(config),
        save_steps=None,
        logging_steps=1,
        temperature=config.temperature,
    )
    TeacherCache.build(
        teacher,
        train,
        path,
        mode=config.cache_mode,
        k=config.cache_k,
        sampler=config.cache_sampler,
        temperature=config.temperature,
        batch_size=config.batch_size,
        tokenizer=tokenizer,
        args=data_args,
        seed=config.seed,
        progress=progress,
    )


def student_training(config: SweepConfig) -> Any:
    """How every student of the sweep trains (and how its rows are prepared)."""
    from hf_capgap.utils.training_arguments import StudentTraining

    return StudentTraining(
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        learning_rate=config.learning_rate,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_ratio=config.warmup_ratio,
        bf16=config.bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
    )


def evaluate_student(model: Any, eval_rows: Any, batch_size: int) -> dict[str, float | int]:
    from hf_capgap.models import evaluate_perplexity

    return evaluate_perplexity(model, eval_rows, batch_size=batch_size)


def evaluate_loss(model: Any, eval_rows: Any, batch_size: int) -> float:
    return evaluate_student(model, eval_rows, batch_size)["eval_loss"]


@contextmanager
def scratch_dir(output_dir: Path) -> Iterator[Path]:
    """Trainer output for one run: nothing of it is kept, the ledger record is the result."""
    path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=output_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
