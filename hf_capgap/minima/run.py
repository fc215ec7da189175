"""The MiniMA recipe as library stages: plan -> prune -> distill -> evaluate -> export (-> Hub).

MiniMA-3B was made by structurally pruning LLaMA-2-7B and distilling it with 0.5 x LM cross-entropy +
0.5 x forward KL at T = 1. :func:`run_minima` does the same at any scale, one stage per module:

    config           MinimaConfig, YAML + ``--key value`` parsing, checks that load nothing
    plan             teacher and student sizes from the law, sequence length, steps (meta device only)
    assistants       teacher assistants (``assistants``): their sizes, shapes and one Plan per chain stage
    dry_run          ``--dry_run``: shapes, counts, tokens, steps and per-stage, per-GPU memory estimates
    teacher          the teacher's tokenizer, frozen model and identity
    data             packed training, held-out and calibration rows (in memory or streamed)
    prune            Taylor pruning, one process, before any sharded group
    distill          distillation and the optional from-scratch baseline (every process)
    evaluate         held-out loss of every model through Trainer.evaluate (every process)
    export           the table, the Hub-ready folder and its card

Every stage is resumable: finished stages live in ``<output_dir>/.work/<run_name>/`` under names that
hash their inputs, each with a manifest checked on reuse; training stages resume from their last
Trainer checkpoint. With teacher assistants, each assistant is one more prune + distill stage of the same
code, its teacher the model above it; the next stage loads the finished assistant as its frozen teacher.
The exported folder ``<output_dir>/<run_name>/`` appears atomically, once complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.utils import logging

from hf_capgap.minima.arguments import build_config, parse_minima_args
from hf_capgap.minima.config import MinimaConfig
from hf_capgap.minima.plan import Plan, make_plan, run_settings, steps_for, tokens_per_step

__all__ = ["MinimaConfig", "Plan", "build_config", "make_plan", "parse_minima_args", "run_minima"]

logger = logging.get_logger(__name__)


def run_minima(config: MinimaConfig, show: Callable[[str], None] = logger.info) -> dict[str, Any] | None:
    """Run (or resume, or reprint) the recipe; returns the results written to results.json.

    What a user must see goes to ``show`` (the recipe passes ``print``; the library itself only logs it):
    the results table and the Hub commit on the main process; ``dry_run`` shows the plan and returns None;
    ``prune_only`` prunes, shows the folder and returns None.
    """
    from hf_capgap.minima.export import finished_results

    if config.dry_run:
        from hf_capgap.minima.dry_run import dry_run

        show(dry_run(config)["summary"])
        return None
    plan = make_plan(config)
    results = finished_results(config, plan)
    if results is None:
        results = _run_stages(config, plan, show)
        if results is None:
            return None
    from hf_capgap.minima.distill import is_main
    from hf_capgap.minima.export import format_table

    if is_main():
        show(format_table(results))
        if config.push_to_hub is not None:
            from hf_capgap.hub import push_student

            url = push_student(
                config.run_dir, config.push_to_hub, private=config.hub_private, endpoint=config.hub_endpoint
            )
            show(f"pushed to {url}")
    return results


def _run_stages(config: MinimaConfig, plan: Plan, show: Callable[[str], None]) -> dict[str, Any] | None:
    from hf_capgap.minima import data as minima_data
    from hf_capgap.minima import distill as minima_distill
    from hf_capgap.minima import evaluate as minima_evaluate
    from hf_capgap.minima import export as minima_export
    from hf_capgap.minima import prune as minima_prune
    from hf_capgap.minima import teacher as minima_teacher
    from hf_capgap.minima.assistants import stage_plans
    from hf_capgap.utils.processes import process_state

    location = minima_teacher.teacher_location(config, plan)
    tokenizer = minima_teacher.load_tokenizer(config, location)
    with process_state().main_process_first():  # one process fills the datasets cache, the others read it
        data = minima_data.prepare_data(config, plan, tokenizer)
    loaded = minima_teacher.load_teacher(config, plan, location)
    teacher = _Teacher(loaded, minima_teacher.teacher_identity(plan, location, loaded))
    del loaded
    *assistant_plans, student_plan = stage_plans(plan)
    # Each assistant is pruned from the model above it and distilled from it, then becomes the next teacher.
    teacher_scores = []  # of each stage's teacher: the original one, then each assistant
    assistant_dirs = []
    for stage_plan in assistant_plans:
        assistant_dir, _ = minima_prune.prune_stage(config, stage_plan, teacher.model, data, teacher.identity)
        distilled, score = _distil_and_score(config, stage_plan, teacher, assistant_dir, data)
        teacher_scores.append(score)
        assistant_dirs.append(distilled)
        teacher = _Teacher(minima_teacher.load_assistant(config, distilled), distilled.name)
    if student_plan.student_init is None:
        student_dir, pruned_manifest = minima_prune.prune_stage(
            config, student_plan, teacher.model, data, teacher.identity
        )
        kept_fraction = pruned_manifest["kept_fraction"]
    else:
        student_dir, kept_fraction = Path(plan.student_init), plan.student_params / plan.teacher_params
    if config.prune_only:
        show(f"pruned student: {student_dir}\nlaunch the distillation with: --student_init {student_dir}")
        return None
    # Each teacher is scored, then freed, right after its last use: the cache build (teacher_cache) or the
    # distillation (online); the students after it train and are scored without it in memory.
    distilled, score = _distil_and_score(config, student_plan, teacher, student_dir, data)
    teacher_scores.append(score)
    del teacher
    folders = {"pruned": student_dir, "distilled": distilled}
    if config.baseline:
        folders["scratch"] = minima_distill.scratch_stage(config, plan, student_dir, data)
    scores = {"teacher": teacher_scores[0], **minima_evaluate.evaluate_stage(config, folders, data)}
    if minima_distill.is_main():
        steps = steps_for(config, plan)
        results = {
            "run_name": config.run_name,
            "teacher": Path(plan.teacher).name if plan.teacher_kind == "local" else plan.teacher,
            "choice": plan.choice,
            "train_tokens": steps * tokens_per_step(config, plan),
            "distinct_train_tokens": minima_distill.distinct_train_tokens(folders["distilled"]),
            "steps": steps,
            "eval_rows": len(data.eval),
            "kept_fraction": kept_fraction,
            "eval": {key: scores.get(key) for key in ("teacher", "pruned", "distilled", "scratch")},
            "settings": run_settings(config, plan),
        }
        if plan.assistants:  # 'auto' with the teacher within reach plans none: a direct run
            results["chain"] = _chain_record(results, plan, assistant_dirs, teacher_scores[1:], folders["distilled"])
        minima_export.export_run(config, plan, results, folders["distilled"])
    minima_distill.wait()
    return minima_export.finished_results(config, plan)


class _Teacher:
    """The frozen teacher of the current stage and its identity; :meth:`release` drops the only reference."""

    def __init__(self, model: Any, identity: str) -> None:
        self.model, self.identity = model, identity

    def release(self) -> None:
        self.model = None
        _free_memory()


def _distil_and_score(
    config: MinimaConfig, plan: Plan, teacher: _Teacher, student_dir: Path, data: Any
) -> tuple[Path, dict]:
    """Distil ``student_dir`` from ``teacher`` (through a cache or online), scoring and releasing the teacher
    right after its last use: the cache build, or the distillation."""
    from hf_capgap.minima import distill as minima_distill
    from hf_capgap.minima import evaluate as minima_evaluate

    evaluation_dir = config.work_dir / "evaluation"
    score = None
    if config.teacher_cache:
        minima_distill.teacher_cache_stage(config, plan, teacher.model, student_dir, data, teacher.identity)
        score = minima_evaluate.held_out_score(config, teacher.model, data, evaluation_dir)
        teacher.release()
    distilled = minima_distill.distill_stage(config, plan, teacher.model, student_dir, data, teacher.identity)
    if teacher.model is not None:
        score = minima_evaluate.held_out_score(config, teacher.model, data, evaluation_dir)
        teacher.release()
    return distilled, score


def _chain_record(
    results: dict[str, Any], plan: Plan, assistant_dirs: list[Path], assistant_scores: list[dict], distilled: Path
) -> list[dict[str, Any]]:
    """teacher -> assistants -> student, each with its params, held-out loss, training tokens and wall seconds
    (of the training call that finished its distillation; the teacher was trained elsewhere)."""
    from hf_capgap.minima.distill import stage_record

    def entry(role: str, name: str, score: dict, target: float | None, folder: Path | None) -> dict[str, Any]:
        record = {} if folder is None else stage_record(folder)
        return {
            "role": role,
            "name": name,
            "params": score["params"],
            "target_params": target,
            "loss": score["loss"],
            "train_tokens": record.get("train_tokens"),
            "wall_seconds": record.get("wall_seconds"),
        }

    chain = [entry("teacher", results["teacher"], results["eval"]["teacher"], None, None)]
    for assistant, folder, score in zip(plan.assistants, assistant_dirs, assistant_scores, strict=True):
        chain.append(entry("assistant", assistant.name, score, assistant.target_params, folder))
    chain.append(entry("student", results["run_name"], results["eval"]["distilled"], plan.student_params, distilled))
    return chain


def _free_memory() -> None:
    """Reclaim a model the caller just dropped: the Trainers that ran it leave reference cycles, and CUDA
    keeps freed blocks cached, so without this the teacher would stay resident through the next stages."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
