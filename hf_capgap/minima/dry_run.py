"""``--dry_run``: what a MiniMA run would do and roughly what it needs per GPU, from configs alone.

Teacher and student are built on the meta device (no weights read, nothing allocated), so a folder
holding only a ``config.json`` is enough, offline. The memory figures are arithmetic estimates, per
stage of the run and per process, for the launch (single process, DDP, FSDP full sharding or DeepSpeed
ZeRO-3), in the precision that will run: the teacher's dtype as ``teacher_dtype`` resolves on the
launch's device (``auto``: bf16 on a GPU, fp32 on a CPU) and activations in the trainer's precision
(``bf16: true``, else the launch's ``mixed_precision``, else fp32). What they assume:

* student: 4 bytes of fp32 weights, 4 of gradients and 8 of AdamW moments per parameter (divided by
  the process count where sharded), plus the 16-bit weight copies autocast keeps for the backward pass;
* activations per token and layer: ``8 x hidden + 4 x intermediate`` values (a LLaMA-style block's
  saved inputs of attention, norms and the gated MLP; memory-efficient attention keeps no s^2 term),
  or with checkpointing the layer input plus one layer recomputed;
* full ``[tokens, vocab]`` logits where a stage computes a plain cross-entropy (Taylor scores, the
  from-scratch baseline, evaluation): the logits, their fp32 log-softmax and fp32 gradient; the
  distillation loss is chunked and its logits are not counted;
* the teacher is loaded whole onto every GPU before anything shards it, and freed after its last use
  (the cache build with ``teacher_cache``, else the distillation);
* when the run generates (``lmbda > 0`` or ``seq_kd``), training rows of prompt_tokens + max_completion_length
  tokens, and the KV cache of generation in the distill stage: ``2 x layers x kv_heads x head_dim x batch x
  (prompt + completion) x bytes`` for the student (in the activations' precision), plus the teacher's (in its
  dtype) with ``seq_kd``.

Not counted: the CUDA context / framework runtime, allocator fragmentation, the data. They are not
measurements; ``tests/minima/test_minima.py`` compares them with measured peaks of a small CPU run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hf_capgap.errors import ConfigError
from hf_capgap.minima.config import NO_ASSISTANTS, MinimaConfig
from hf_capgap.minima.plan import (
    SINGLE_PROCESS_ASSISTANTS,
    Plan,
    ladder_rungs,
    load_law,
    make_plan,
    resolve_teacher,
    row_tokens,
    steps_for,
    tokens_per_step,
)
from hf_capgap.minima.plan import student_skeleton as init_skeleton
from hf_capgap.utils.parameters import count_model_parameters

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
TRAINING_PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "no": "float32", "fp32": "float32"}


@dataclass(frozen=True)
class Launch:
    """How the run is spread: ``strategy`` is single, ddp, fsdp, zero2 or zero3."""

    strategy: str
    processes: int
    source: str
    device: str = "cuda"  # "cuda" or "cpu": where the launch runs, which resolves teacher_dtype: auto
    mixed_precision: str = "no"  # accelerate's mixed_precision, which the trainer uses unless bf16: true

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
    device = "cpu" if bool(values.get("use_cpu", False)) else "cuda"
    return Launch(strategy, processes, Path(path).name, device, str(values.get("mixed_precision", "no")).lower())


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
    from hf_capgap.utils.processes import use_cpu

    return Launch(
        strategy,
        processes,
        "this launch",
        "cpu" if use_cpu() else "cuda",
        os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
    )


@dataclass(frozen=True)
class Precision:
    """The dtypes the run will use: the teacher's (``teacher_dtype`` resolved) and the students' activations."""

    teacher: str  # torch dtype name
    training: str  # torch dtype name of the activations (autocast), float32 without mixed precision

    @property
    def teacher_bytes(self) -> int:
        return DTYPE_BYTES[self.teacher]

    @property
    def activation_bytes(self) -> int:
        return DTYPE_BYTES[self.training]


def resolve_precision(config: MinimaConfig, launch: Launch) -> Precision:
    """As the run resolves them: ``teacher_dtype`` on the launch's device, and the trainer's precision
    (``bf16: true``, else accelerate's ``mixed_precision``, which TrainingArguments reads from the launch)."""
    import torch

    from hf_capgap.models import resolve_teacher_dtype

    teacher = str(resolve_teacher_dtype(config.teacher_dtype, torch.device(launch.device))).removeprefix("torch.")
    mixed = "bf16" if config.bf16 else launch.mixed_precision
    if mixed not in TRAINING_PRECISIONS:
        raise ConfigError(
            f"mixed_precision={mixed!r} of {launch.source} is not one the dry run knows "
            f"({', '.join(TRAINING_PRECISIONS)}); set it in the accelerate config."
        )
    return Precision(teacher, TRAINING_PRECISIONS[mixed])


def _shape(model: Any) -> tuple[int, int, int, int]:
    """(hidden, intermediate, layers, vocab) of a model's config."""
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return hidden, intermediate, config.num_hidden_layers, config.vocab_size


def activation_bytes(model: Any, tokens: int, dtype_bytes: int, checkpointing: bool) -> float:
    """Activations a backward pass through ``model`` keeps for ``tokens`` (see the module docstring)."""
    hidden, intermediate, layers, _ = _shape(model)
    per_layer = 8 * hidden + 4 * intermediate
    if checkpointing:
        return (hidden * layers + per_layer) * tokens * dtype_bytes
    return per_layer * layers * tokens * dtype_bytes


def logits_bytes(model: Any, tokens: int, dtype_bytes: int) -> float:
    """A plain cross-entropy's ``[tokens, vocab]`` logits, fp32 log-softmax and fp32 gradient."""
    return _shape(model)[3] * tokens * (dtype_bytes + 4 + 4)


def kv_cache_bytes(model: Any, rows: int, tokens: int, dtype_bytes: int) -> float:
    """Keys and values ``model.generate`` caches for ``rows`` sequences of ``tokens``: 2 x layers x kv_heads x
    head_dim x rows x tokens x bytes (an estimate: the cache grows to this at the longest completion)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * rows * tokens * dtype_bytes


def generation_memory(
    config: MinimaConfig, plan: Plan, teacher: Any, student: Any, precision: Precision
) -> dict[str, float]:
    """The distill stage's KV caches of generation (none when the run does not generate)."""
    if not config.generates:
        return {}
    tokens = row_tokens(config, plan)
    parts = {
        "KV cache, student generation": kv_cache_bytes(student, config.batch_size, tokens, precision.activation_bytes)
    }
    if config.seq_kd:
        parts["KV cache, teacher generation (seq_kd)"] = kv_cache_bytes(
            teacher, config.batch_size, tokens, precision.teacher_bytes
        )
    return parts


def memory_estimate(
    config: MinimaConfig, plan: Plan, launch: Launch, teacher: Any, student: Any, precision: Precision
) -> dict[str, dict[str, float]]:
    """Bytes per GPU by stage and component, each stage with its ``total``, in the order the run goes."""
    params = count_model_parameters(student)
    weight_shards = launch.processes if launch.shards_weights else 1
    optimizer_shards = launch.processes if launch.shards_optimizer else 1
    whole_teacher = precision.teacher_bytes * plan.teacher_params
    act = precision.activation_bytes
    checkpointing = config.gradient_checkpointing
    rows_tokens = config.batch_size * plan.seq_len  # one calibration batch (one micro-batch off-policy)
    train_tokens = config.batch_size * row_tokens(config, plan)  # one training micro-batch
    eval_tokens = config.eval_batch_size * plan.seq_len
    student_state = {
        "student weights (fp32)": 4 * params / weight_shards,
        "gradients (fp32)": 4 * params / optimizer_shards,
        "AdamW states (fp32 m, v)": 8 * params / optimizer_shards,
        f"autocast {precision.training} weight copies": 0.0 if act == 4 else act * params / weight_shards,
        "student activations": activation_bytes(student, train_tokens, act, checkpointing),
    }
    stages: dict[str, dict[str, float]] = {
        "teacher load": {"teacher weights (whole, before any sharding)": whole_teacher},
    }
    if plan.student_init is None:
        stages["prune (Taylor scores, one process)"] = {
            "teacher weights": whole_teacher,
            "teacher activations (backward to the masks)": activation_bytes(
                teacher, rows_tokens, precision.teacher_bytes, checkpointing
            ),
            "teacher logits, log-softmax, gradient": logits_bytes(teacher, rows_tokens, precision.teacher_bytes),
        }
    if config.teacher_cache:
        stages["teacher cache build"] = {
            "teacher weights (unsharded)": whole_teacher,
            "teacher logits and log-probs": logits_bytes(teacher, eval_tokens, precision.teacher_bytes),
        }
    stages["distill"] = {
        **student_state,
        "teacher weights": 0.0 if config.teacher_cache else whole_teacher / weight_shards,
        **generation_memory(config, plan, teacher, student, precision),
    }
    if config.baseline:
        stages["baseline (from scratch)"] = {
            **student_state,
            "full logits, log-softmax, gradient": logits_bytes(student, train_tokens, act),
        }
    stages["evaluation"] = {
        "largest model's weights": max(whole_teacher, 4 * params),
        "logits of one batch": logits_bytes(teacher, eval_tokens, precision.teacher_bytes),
    }
    for parts in stages.values():
        parts["total"] = sum(parts.values())
    return stages


def peak_stage(memory: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The stage needing the most memory per GPU, and that amount."""
    name = max(memory, key=lambda stage: memory[stage]["total"])
    return name, memory[name]["total"]


def cache_bytes(config: MinimaConfig, plan: Plan, vocab_size: int) -> int:
    """TeacherCache size on disk for the training tokens, an upper bound for sampled caches.

    Per token: its id and its int32 label; per labelled position (all but each row's last, for packed
    rows) the signal: top-k ids, fp16 log-probs and a float32 tail; or, sampled, d distinct ids as
    varint-coded gaps of which r were drawn more than once (a uint8 slot and count each; d + r <=
    ``cache_k``) plus two uint8 sizes and an fp16 entropy (``sampled_bytes_bound``; a peaked teacher
    draws fewer distinct ids, closer together); or the dense fp16 distribution.
    """
    import numpy as np

    from hf_capgap.cache.format import id_dtype, sampled_bytes_bound

    id_bytes = np.dtype(id_dtype(vocab_size)).itemsize
    per_position = {
        "topk": config.cache_k * (id_bytes + 2) + 4,
        "sampled": sampled_bytes_bound(config.cache_k, vocab_size),
        "dense": 2 * vocab_size,
    }[config.cache_mode]
    tokens = steps_for(config, plan) * tokens_per_step(config, plan)
    positions = tokens * (plan.seq_len - 1) // plan.seq_len
    return tokens * (id_bytes + 4) + positions * per_position


def student_skeleton(config: MinimaConfig, plan: Plan, teacher: Any) -> Any:
    """The student on the meta device: student_init's config, the explicit shape, or the target's shape."""
    from hf_capgap.pruning import PruneShape, shape_for_target
    from hf_capgap.pruning.layouts import meta_model, pruned_config, validate_shape

    if plan.student_init is not None:
        return init_skeleton(plan.student_init)
    if plan.student_shape is not None:
        shape = validate_shape(teacher.config, PruneShape.from_value(plan.student_shape))
    else:
        shape = shape_for_target(teacher, plan.student_params)
    return meta_model(pruned_config(teacher.config, shape))


def chain_skeletons(config: MinimaConfig, plan: Plan, teacher: Any) -> list[tuple[Plan, Any, Any]]:
    """(stage plan, its teacher, its student) on the meta device for each teacher -> student stage in run
    order: each assistant cut from the model above it, then the student from the last one (one stage without
    assistants)."""
    from hf_capgap.minima.assistants import stage_plans

    stages = []
    for stage in stage_plans(plan):
        student = student_skeleton(config, stage, teacher)
        stages.append((stage, teacher, student))
        teacher = student
    return stages


def chain_memory(
    config: MinimaConfig, launch: Launch, chain: list[tuple[Plan, Any, Any]], precision: Precision
) -> dict[str, dict[str, float]]:
    """:func:`memory_estimate` per stage, each with its own teacher and student: the original teacher's load
    and evaluation, each assistant's prune and distill (named after it), the student's stages as without
    assistants (whose teacher is the last assistant, loaded with its stage's rows)."""
    if len(chain) == 1:
        return memory_estimate(config, chain[0][0], launch, chain[0][1], chain[0][2], precision)
    memory = {}
    last = len(chain) - 1
    for index, (stage, teacher, student) in enumerate(chain):
        prefix = "" if index == last else f"{stage_name(chain, index)}: "
        for name, parts in memory_estimate(config, stage, launch, teacher, student, precision).items():
            skip = (name == "teacher load" and index > 0) or (name == "evaluation" and index > 0)
            if not skip and not (name.startswith("baseline") and index < last):
                memory[name if name in ("teacher load", "evaluation") else prefix + name] = parts
    memory["evaluation"] = memory.pop("evaluation")  # the original teacher's, scored last of all
    return memory


def stage_name(chain: list[tuple[Plan, Any, Any]], index: int) -> str:
    return chain[index + 1][0].teacher if index + 1 < len(chain) else "student"


def stage_tokens(config: MinimaConfig, stage: Plan) -> int:
    return steps_for(config, stage) * tokens_per_step(config, stage)


def chain_lines(
    config: MinimaConfig, plan: Plan, chain: list[tuple[Plan, Any, Any]], memory: dict[str, dict[str, float]]
) -> list[str]:
    """The chain teacher -> assistants -> student, a line per stage: its teacher, student shape, tokens and
    the per-GPU memory of its distillation; nothing without assistants."""
    if len(chain) == 1:
        return []
    from hf_capgap.law import format_params

    sizes = [plan.teacher_params] + [count_model_parameters(student) for _, _, student in chain]
    lines = [
        f"chain    {' -> '.join(format_params(size) for size in sizes)} ({config.assistants}; each step pruned "
        "from the model above it and distilled from it)"
    ]
    for index, (stage, _, student) in enumerate(chain):
        name = stage_name(chain, index)
        distill = memory["distill" if name == "student" else f"{name}: distill"]["total"]
        lines.append(
            f"  {name:<12} from {stage.teacher} ({stage.teacher_params:,} params): {describe(student)}; "
            f"{stage_tokens(config, stage):,} tokens in {steps_for(config, stage):,} steps; "
            f"distill {distill / GIB:.2f} GiB per GPU"
        )
    return lines


def describe(model: Any) -> str:
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    return (
        f"{count_model_parameters(model):,} params: hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {heads} heads ({kv} KV), MLP {mlp}, vocab {config.vocab_size}"
    )


def generation_lines(config: MinimaConfig, plan: Plan, memory: dict[str, dict[str, float]]) -> list[str]:
    """What generation adds when the run generates: tokens per row, GKD's settings and the KV-cache estimate."""
    if not config.generates:
        return []
    kv = sum(value for name, value in memory["distill"].items() if name.startswith("KV cache"))
    return [
        f"generate {row_tokens(config, plan)} prompt + completion tokens per row (prompt_tokens="
        f"{config.prompt_tokens} + max_completion_length={config.max_completion_length}; "
        "completions stopping at EOS count as full); "
        f"lmbda={config.lmbda:g}, seq_kd={str(config.seq_kd).lower()}, sampling_temperature="
        f"{config.sampling_temperature:g}, top_k={config.top_k}, top_p={config.top_p:g}",
        f"         KV cache of generation, estimated (not measured): {kv / 2**20:,.2f} MiB per GPU "
        f"({'student and teacher' if config.seq_kd else 'student'}), counted in the distill stage below",
    ]


def law_optimal_teacher(law: Any, student_params: int) -> tuple[float | None, str]:
    """The teacher size the law predicts for this student (its own line: ratio, or slope and intercept),
    and how the dry run states it; None where an affine law predicts no teacher larger than the student."""
    from hf_capgap.law import format_params

    try:
        teacher = float(law.predict(student_params).params)
    except ValueError:
        return None, (
            f"the law predicts no teacher larger than this {format_params(student_params)} student: it lies "
            "outside the range where the affine fit is meaningful (use a through-origin law for it)"
        )
    return teacher, f"the law-optimal teacher for this student has {format_params(teacher)} parameters"


def dry_run(config: MinimaConfig) -> dict[str, Any]:
    """The plan and the estimates, with ``summary``: the text ``--dry_run`` shows. Loads, downloads and
    allocates nothing."""
    launch = launch_from_yaml(config.accelerate_config) if config.accelerate_config else launch_from_environment()
    plan = make_plan(config, processes=launch.processes)
    _, teacher = resolve_teacher(config, plan.teacher, ladder_rungs(config))
    chain = chain_skeletons(config, plan, teacher)
    student = chain[-1][2]
    law = load_law(config)
    steps = steps_for(config, plan)
    precision = resolve_precision(config, launch)
    memory = chain_memory(config, launch, chain, precision)
    peak_name, peak = peak_stage(memory)
    global_rows = config.batch_size * config.gradient_accumulation_steps * launch.processes
    ratio = plan.teacher_params / count_model_parameters(student)
    law_teacher, law_line = law_optimal_teacher(law, count_model_parameters(student))
    lines = [
        f"MiniMA dry run {config.run_name} (meta device: nothing loaded, downloaded or trained)",
        f"teacher  {plan.teacher} ({plan.teacher_kind}): {describe(teacher)}",
        f"student  {describe(student)}",
        f"         {plan.choice or 'student size as requested'}",
        f"law      {law.source}, {law.formula()}: this pair's teacher/student ratio is {ratio:.2f}; {law_line}",
        f"tokens   {steps * tokens_per_step(config, plan):,} in {steps:,} steps; global batch {global_rows:,} rows "
        f"({config.batch_size} per GPU x {config.gradient_accumulation_steps} accumulation x {launch.processes} "
        f"processes) x {row_tokens(config, plan)} tokens = {tokens_per_step(config, plan):,} tokens per step",
        *generation_lines(config, plan, memory),
        f"launch   {launch.strategy}, {launch.processes} process(es) on {launch.device} ({launch.source}); teacher in "
        f"{precision.teacher} (teacher_dtype={config.teacher_dtype}), student activations in {precision.training} "
        f"(bf16={str(config.bf16).lower()}, launch mixed_precision={launch.mixed_precision}), "
        f"gradient_checkpointing={str(config.gradient_checkpointing).lower()}",
        *chain_lines(config, plan, chain, memory),
        "memory per GPU by stage, estimated from the shapes (not measured; runtime and CUDA context not counted):",
    ]
    for stage, parts in memory.items():
        lines.append(f"  {stage:<58}{parts['total'] / GIB:>10.2f} GiB")
        lines += [
            f"    {name:<56}{value / GIB:>10.2f} GiB" for name, value in parts.items() if name != "total" and value
        ]
    lines.append(f"  peak: {peak_name}, {peak / GIB:.2f} GiB per GPU")
    if launch.shards_weights and memory["teacher load"]["total"] > memory["distill"]["teacher weights"]:
        whole = memory["teacher load"]["total"] / GIB
        lines.append(
            f"  note: the teacher is loaded whole onto every GPU ({whole:.2f} GiB) before {launch.strategy} "
            "shards it for the distillation, so each GPU must hold it once."
        )
    if launch.processes > 1 and config.assistants.strip().lower() != NO_ASSISTANTS:
        lines.append(f"note     {SINGLE_PROCESS_ASSISTANTS}.")
    elif launch.processes > 1 and plan.student_init is None:
        lines.append(
            "note     pruning runs in one process: run with --prune_only first, then launch with --student_init."
        )
    report: dict[str, Any] = {
        "plan": plan,
        "launch": launch,
        "steps": steps,
        "memory": memory,
        "precision": precision,
        "peak": (peak_name, peak),
        "teacher_params": plan.teacher_params,
        "student_params": count_model_parameters(student),
        "law_teacher_params": law_teacher,
        "student_config": student.config,
        "chain": [
            {"teacher": stage.teacher, "params": count_model_parameters(model), "tokens": stage_tokens(config, stage)}
            for stage, _, model in chain
        ],
    }
    if config.teacher_cache:
        report["cache_bytes"] = cache_bytes(config, plan, teacher.config.vocab_size)
        lines.append(
            f"teacher cache ({config.cache_mode}, k={config.cache_k}) on disk, estimated: "
            f"{report['cache_bytes'] / GIB:,.1f} GiB"
        )
    report["summary"] = "\n".join(lines)
    return report
