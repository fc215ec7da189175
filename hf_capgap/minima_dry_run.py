"""``--dry_run``: what a MiniMA run would do and roughly what it needs per GPU, from configs alone.

Teacher and student are built on the meta device (no weights read, nothing allocated), so a folder
holding only a ``config.json`` is enough, offline. The memory figures are arithmetic estimates for
the launch (single process, DDP, FSDP full sharding or DeepSpeed ZeRO-3): per parameter 4 bytes of
fp32 weights, 4 of gradients and 8 of AdamW moments, divided by the process count where sharded; the
frozen teacher at its dtype; activations at 34 bytes x hidden per token and layer in bf16 without
checkpointing (Korthikanti et al. 2022, memory-efficient attention, no s^2 term) and 2 bytes x hidden
(the layer inputs) plus one layer's full activations with it. They are not measurements.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hf_capgap.minima_config import MinimaConfig
from hf_capgap.minima_plan import Plan, count_params, ladder_rungs, load_law, make_plan, resolve_teacher, steps_for
from hf_capgap.minima_plan import student_skeleton as init_skeleton
from hf_capgap.minima_plan import tokens_per_step

GIB = 1024**3
ACTIVATION_BYTES_PER_HIDDEN = 34  # per token and layer, bf16, no checkpointing
CHECKPOINT_BYTES_PER_HIDDEN = 2  # the saved bf16 layer input per token and layer
TEACHER_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Launch:
    """How the run is spread: ``strategy`` is single, ddp, fsdp, zero2 or zero3."""

    strategy: str
    processes: int
    source: str

    @property
    def shards_weights(self) -> bool:
        return self.strategy in ("fsdp", "zero3")

    @property
    def shards_optimizer(self) -> bool:
        return self.strategy in ("fsdp", "zero2", "zero3")


def launch_from_yaml(path: str) -> Launch:
    values = yaml.safe_load(Path(path).read_text()) or {}
    processes = int(values.get("num_processes", 1))
    kind = str(values.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        stage = int((values.get("deepspeed_config") or {}).get("zero_stage", 0))
        strategy = f"zero{stage}" if stage in (2, 3) else "ddp"
    elif kind == "FSDP":
        strategy = "fsdp"
    else:
        strategy = "ddp" if processes > 1 else "single"
    return Launch(strategy, processes, Path(path).name)


def launch_from_environment() -> Launch:
    """The launch this process runs under (``accelerate launch`` exports its choice)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))
        strategy = f"zero{stage}" if stage in (2, 3) else "ddp"
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        strategy = "fsdp"
    else:
        strategy = "ddp" if processes > 1 else "single"
    return Launch(strategy, processes, "this launch")


def memory_estimate(config: MinimaConfig, plan: Plan, launch: Launch, student: Any) -> dict[str, float]:
    """Bytes per GPU by component, and the totals with and without activation checkpointing."""
    params = count_params(student)
    weight_shards = launch.processes if launch.shards_weights else 1
    optimizer_shards = launch.processes if launch.shards_optimizer else 1
    teacher_dtype = "bfloat16" if config.teacher_dtype == "auto" else config.teacher_dtype
    hidden, layers = student.config.hidden_size, student.config.num_hidden_layers
    tokens = config.batch_size * plan.seq_len  # one micro-batch
    parts = {
        "student weights (fp32)": 4 * params / weight_shards,
        "gradients (fp32)": 4 * params / optimizer_shards,
        "AdamW states (fp32 m, v)": 8 * params / optimizer_shards,
        "teacher weights": 0.0 if config.teacher_cache else TEACHER_BYTES[teacher_dtype] * plan.teacher_params / weight_shards,
        "activations without checkpointing": ACTIVATION_BYTES_PER_HIDDEN * hidden * layers * tokens,
        "activations with checkpointing": (CHECKPOINT_BYTES_PER_HIDDEN * layers + ACTIVATION_BYTES_PER_HIDDEN) * hidden * tokens,
    }
    fixed = sum(parts[key] for key in list(parts)[:4])
    parts["total with checkpointing"] = fixed + parts["activations with checkpointing"]
    parts["total without checkpointing"] = fixed + parts["activations without checkpointing"]
    return parts


def cache_bytes(config: MinimaConfig, plan: Plan, vocab_size: int) -> int:
    """TeacherCache size on disk for the training tokens, an upper bound for sampled caches.

    Per token: its id and its int32 label; per labelled position (all but each row's last, for packed
    rows) the signal: top-k ids, fp16 log-probs and a float32 tail; or, sampled, d distinct ids as
    varint-coded gaps of which r were drawn more than once (a uint8 slot and count each; d + r <=
    ``cache_k``) plus two uint8 sizes and an fp16 entropy (``sampled_bytes_bound``; a peaked teacher
    draws fewer distinct ids, closer together); or the dense fp16 distribution.
    """
    import numpy as np

    from hf_capgap.cache_format import id_dtype, sampled_bytes_bound

    id_bytes = np.dtype(id_dtype(vocab_size)).itemsize
    per_position = {"topk": config.cache_k * (id_bytes + 2) + 4,
                    "sampled": sampled_bytes_bound(config.cache_k, vocab_size),
                    "dense": 2 * vocab_size}[config.cache_mode]
    tokens = steps_for(config, plan) * tokens_per_step(config, plan)
    positions = tokens * (plan.seq_len - 1) // plan.seq_len
    return tokens * (id_bytes + 4) + positions * per_position


def student_skeleton(config: MinimaConfig, plan: Plan, teacher: Any) -> Any:
    """The student on the meta device: student_init's config, the explicit shape, or the target's shape."""
    from hf_capgap.pruning import PruneShape, shape_for_target
    from hf_capgap.pruning_layouts import meta_model, pruned_config, validate_shape

    if plan.student_init is not None:
        return init_skeleton(plan.student_init)
    if plan.student_shape is not None:
        shape = validate_shape(teacher.config, PruneShape.from_value(plan.student_shape))
    else:
        shape = shape_for_target(teacher, plan.student_params)
    return meta_model(pruned_config(teacher.config, shape))


def describe(model: Any) -> str:
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    return (f"{count_params(model):,} params: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{heads} heads ({kv} KV), MLP {mlp}, vocab {config.vocab_size}")


def dry_run(config: MinimaConfig) -> dict[str, Any]:
    """Print the plan and the estimates; return them. Loads, downloads and allocates nothing."""
    from hf_capgap.law import format_params

    launch = launch_from_yaml(config.accelerate_config) if config.accelerate_config else launch_from_environment()
    plan = make_plan(config, processes=launch.processes)
    _, teacher = resolve_teacher(config, plan.teacher, ladder_rungs(config))
    student = student_skeleton(config, plan, teacher)
    law = load_law(config)
    steps = steps_for(config, plan)
    memory = memory_estimate(config, plan, launch, student)
    global_rows = config.batch_size * config.gradient_accumulation_steps * launch.processes
    ratio = plan.teacher_params / count_params(student)
    lines = [
        f"MiniMA dry run {config.run_name} (meta device: nothing loaded, downloaded or trained)",
        f"teacher  {plan.teacher} ({plan.teacher_kind}): {describe(teacher)}",
        f"student  {describe(student)}",
        f"         {plan.choice or 'student size as requested'}",
        f"law      {law.source}, {law.formula()}: this pair's teacher/student ratio is {ratio:.2f}; the law-optimal "
        f"teacher for this student has {format_params(law.ratio * count_params(student))} parameters",
        f"tokens   {steps * tokens_per_step(config, plan):,} in {steps:,} steps; global batch {global_rows:,} rows "
        f"({config.batch_size} per GPU x {config.gradient_accumulation_steps} accumulation x {launch.processes} "
        f"processes) x {plan.seq_len} tokens = {tokens_per_step(config, plan):,} tokens per step",
        f"launch   {launch.strategy}, {launch.processes} process(es) ({launch.source})",
        "memory per GPU, estimated (not yet measured on a GPU):",
    ]
    lines += [f"  {name:<36}{value / GIB:>10.2f} GiB" for name, value in memory.items()]
    lines.append(f"  configured: gradient_checkpointing={str(config.gradient_checkpointing).lower()}, "
                 f"bf16={str(config.bf16).lower()}; logits are chunked by the fused loss and not counted.")
    if launch.processes > 1 and plan.student_init is None:
        lines.append("note     pruning runs in one process: run with --prune_only first, then launch with --student_init.")
    report: dict[str, Any] = {"plan": plan, "launch": launch, "steps": steps, "memory": memory,
                              "teacher_params": plan.teacher_params, "student_params": count_params(student),
                              "student_config": student.config}
    if config.teacher_cache:
        report["cache_bytes"] = cache_bytes(config, plan, teacher.config.vocab_size)
        lines.append(f"teacher cache ({config.cache_mode}, k={config.cache_k}) on disk, estimated: "
                     f"{report['cache_bytes'] / GIB:,.1f} GiB")
    print("\n".join(lines))
    return report
