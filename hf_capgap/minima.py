"""The MiniMA recipe as library stages: law -> prune -> distill -> evaluate -> export (-> Hub).

MiniMA-3B was made by structurally pruning LLaMA-2-7B and distilling it with 0.5 x LM cross-entropy +
0.5 x forward KL at T = 1. :func:`run_minima` does the same at any scale: it picks the student size
for a teacher from the law of capacity gap (or the teacher for a student size), prunes with Taylor
importance, distils with :class:`~hf_capgap.DistillationTrainer`, trains a same-size model from
scratch on the same tokens as the baseline, and exports a Hub-ready student folder with its card.

Every stage is resumable: finished stages live in ``<output_dir>/.work/<run_name>/`` under names that
hash their inputs, each with a manifest checked on reuse; training stages resume from their last
Trainer checkpoint. The exported folder ``<output_dir>/<run_name>/`` appears atomically, once complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from hf_capgap.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    atomic_directory,
    atomic_write_json,
    dataset_fingerprint,
    json_sha256,
    read_manifest,
)

RUN_KIND = "minima_run"
STAGE_KIND = "minima_stage"
FORMAT_VERSION = 1
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "minima_tiny.yaml"
EMBEDDED_DATASET = "embedded"
EMBEDDED_DATASET_NAME = "hf_capgap embedded Shakespeare + KJV corpus"
STUDENT_SHAPE_FIELDS = ("student_hidden_size", "student_num_layers", "student_num_heads", "student_intermediate_size")
# Fields that change neither what is trained nor what is exported: a run differing only here is the same run.
NON_RESULT_FIELDS = ("push_to_hub", "hub_endpoint", "hub_private", "logging_steps", "save_steps")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class MinimaConfig:
    """Everything a MiniMA run needs; YAML keys and ``--key value`` overrides use these names."""

    run_name: str = field(default="minima-tiny", metadata=_help("Folder name of the run under output_dir."))
    output_dir: str = field(default="outputs", metadata=_help("Where the exported run and its .work/ stages go."))
    teacher: str | None = field(
        default=None,
        metadata=_help(
            "A rung name of `ladder` (pretrained on first use, then reused), a local model folder, or a Hub "
            "model id. null: choose the ladder rung the law suggests for `student_params`."
        ),
    )
    student_params: int | None = field(
        default=170_000,
        metadata=_help("Student size in total parameters. null: the law's best student for the teacher (student_for)."),
    )
    law: str | None = field(
        default=None, metadata=_help("A law.json from `hf-capgap law fit`; null uses the paper's t* = 2.5 s.")
    )
    ladder: str = field(default="tiny", metadata=_help("Ladder preset (hf_capgap.ladder.LADDERS) the teacher rungs come from."))
    ladder_dir: str = field(default="outputs/ladder/tiny", metadata=_help("Folder holding the pretrained ladder teachers."))
    student_hidden_size: int | None = field(default=None, metadata=_help("Explicit student width (all four student_* or none)."))
    student_num_layers: int | None = field(default=None, metadata=_help("Explicit student depth."))
    student_num_heads: int | None = field(default=None, metadata=_help("Explicit student attention heads."))
    student_intermediate_size: int | None = field(default=None, metadata=_help("Explicit student MLP width."))
    layer_selection: str = field(
        default="score",
        metadata=_help("Which layers survive: 'score' (Taylor gate scores) or 'middle' (MiniMA dropped the ends)."),
    )
    calibration_batches: int = field(default=4, metadata=_help("Train batches used for the Taylor importance scores."))
    dataset: str = field(
        default=EMBEDDED_DATASET,
        metadata=_help("'embedded' (the packaged corpus) or a datasets name/path with train/validation splits and a text column."),
    )
    dataset_config: str | None = field(default=None, metadata=_help("Configuration name of `dataset`, if it has several."))
    seq_len: int = field(default=128, metadata=_help("Tokens per packed training row."))
    batch_size: int = field(default=16, metadata=_help("Rows per device per step."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    train_tokens: int = field(
        default=409_600, metadata=_help("Tokens the distilled and the from-scratch student each train on.")
    )
    learning_rate: float = field(default=3e-3, metadata=_help("Peak AdamW learning rate."))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("transformers scheduler name."))
    warmup_ratio: float = field(default=0.01, metadata=_help("Fraction of steps spent warming up (MiniMA: 1%)."))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.95, metadata=_help("AdamW beta2."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm."))
    bf16: bool = field(default=False, metadata=_help("Train in bf16 mixed precision (GPUs)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Trade compute for activation memory."))
    loss: str = field(default="forward_kl", metadata=_help("Divergence (DistillationConfig.loss); MiniMA: forward_kl."))
    alpha: float = field(default=0.5, metadata=_help("Weight of the divergence; 1 - alpha weights LM cross-entropy."))
    temperature: float = field(default=1.0, metadata=_help("Softmax temperature of the divergence."))
    teacher_dtype: str = field(default="auto", metadata=_help("dtype of the frozen teacher (DistillationConfig.teacher_dtype)."))
    teacher_cache: bool = field(
        default=False, metadata=_help("Precompute the teacher's top-k signal once (TeacherCache) instead of running it online.")
    )
    cache_mode: str = field(default="topk", metadata=_help("TeacherCache mode: topk, sampled or dense."))
    cache_k: int = field(default=64, metadata=_help("Logits kept per position by the cache (topk/sampled)."))
    eval_rows: int = field(default=256, metadata=_help("Held-out packed rows every model is scored on."))
    eval_batch_size: int = field(default=16, metadata=_help("Rows per evaluation forward pass."))
    save_steps: int = field(default=50, metadata=_help("Trainer checkpoint interval (what a killed run resumes from)."))
    logging_steps: int = field(default=25, metadata=_help("Trainer logging interval."))
    seed: int = field(default=0, metadata=_help("Seed of data order, calibration and initialisation."))
    push_to_hub: str | None = field(default=None, metadata=_help("Hub repo id ('namespace/name') to push the student to."))
    hub_endpoint: str | None = field(default=None, metadata=_help("Hub URL, e.g. a private Hub; null uses huggingface.co."))
    hub_private: bool = field(default=False, metadata=_help("Create the Hub repo as private."))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def work_dir(self) -> Path:
        return Path(self.output_dir) / ".work" / self.run_name

    @property
    def student_shape(self) -> dict[str, int] | None:
        values = [getattr(self, name) for name in STUDENT_SHAPE_FIELDS]
        if all(value is None for value in values):
            return None
        hidden, layers, heads, intermediate = values
        return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                "intermediate_size": intermediate}

    def result_settings(self) -> dict[str, Any]:
        """The fields that decide the exported student (the run's identity)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NON_RESULT_FIELDS}


# ---------------------------------------------------------------------------------------------- config


def load_config(argv: Sequence[str] = ()) -> MinimaConfig:
    """``[CONFIG.yaml] [--key value ...]`` -> a validated :class:`MinimaConfig` (default: minima_tiny.yaml)."""
    argv = list(argv)
    path = DEFAULT_CONFIG
    if argv and not argv[0].startswith("--"):
        path = Path(argv.pop(0))
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML file such as {DEFAULT_CONFIG}.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a YAML mapping of key: value, got {type(values).__name__}.")
    if len(argv) % 2 or not all(key.startswith("--") for key in argv[::2]):
        raise ValueError(f"overrides must be --key value pairs, got {argv}.")
    values.update({key[2:]: value for key, value in zip(argv[::2], argv[1::2])})
    return build_config(values)


def build_config(values: Mapping[str, Any]) -> MinimaConfig:
    """Type every value by the dataclass field it names; unknown keys and bad values raise ValueError."""
    hints = typing.get_type_hints(MinimaConfig)
    known = [f.name for f in dataclasses.fields(MinimaConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(known)}.")
    config = MinimaConfig(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})
    check_values(config)
    return config


def _coerce(key: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint)
    if type(None) in options:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        (hint,) = [option for option in options if option is not type(None)]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if value is None:
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a valid {hint.__name__}; set {key} to a {hint.__name__}.") from None


def check_values(config: MinimaConfig) -> None:
    """Reject impossible settings by field name; nothing is loaded or trained here."""
    from hf_capgap.ladder import LADDERS
    from hf_capgap.pruning import LAYER_SELECTIONS

    positive = ("seq_len", "batch_size", "gradient_accumulation_steps", "train_tokens", "calibration_batches",
                "eval_rows", "eval_batch_size", "save_steps", "logging_steps", "cache_k")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be >= 1.")
    if config.seq_len < 2:
        raise ValueError(f"seq_len={config.seq_len} must be >= 2 (a row predicts its next tokens).")
    if config.train_tokens < config.batch_size * config.gradient_accumulation_steps * config.seq_len:
        raise ValueError(
            f"train_tokens={config.train_tokens} is less than one optimizer step "
            f"(batch_size*gradient_accumulation_steps*seq_len); raise train_tokens."
        )
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise ValueError(f"learning_rate={config.learning_rate} must be a positive number.")
    if not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio={config.warmup_ratio} must be in [0, 1).")
    if config.ladder not in LADDERS:
        raise ValueError(f"ladder={config.ladder!r} is unknown; choose one of {sorted(LADDERS)}.")
    if config.layer_selection not in LAYER_SELECTIONS:
        raise ValueError(f"layer_selection={config.layer_selection!r} must be one of {LAYER_SELECTIONS}.")
    if config.cache_mode not in ("topk", "sampled", "dense"):
        raise ValueError(f"cache_mode={config.cache_mode!r} must be topk, sampled or dense.")
    if not config.run_name or "/" in config.run_name or config.run_name.startswith("."):
        raise ValueError(f"run_name={config.run_name!r} must be a plain folder name such as 'minima-tiny'.")
    if config.teacher is None and config.student_params is None:
        raise ValueError("set teacher (a ladder rung, folder or Hub id) or student_params (the law picks the teacher).")
    if config.student_params is not None and config.student_params < 1:
        raise ValueError(f"student_params={config.student_params} must be a positive parameter count.")
    shape = [getattr(config, name) for name in STUDENT_SHAPE_FIELDS]
    if any(value is None for value in shape) and any(value is not None for value in shape):
        raise ValueError(f"give all of {', '.join(STUDENT_SHAPE_FIELDS)} or none of them.")
    if config.student_shape is not None and config.student_params is not None:
        raise ValueError("set either student_params or the student_* shape fields, not both.")
    if config.student_shape is not None and min(shape) < 1:
        raise ValueError(f"student shape {config.student_shape} must hold positive sizes.")
    if config.push_to_hub is not None and "/" not in config.push_to_hub:
        raise ValueError(f"push_to_hub={config.push_to_hub!r} must be 'namespace/name'.")
    if config.law is not None and not Path(config.law).is_file():
        raise FileNotFoundError(f"law={config.law} does not exist; write one with `hf-capgap law fit` or set law: null.")
    try:
        _distillation_arguments(config, config.work_dir / "check", 1, None)
    except ValueError as err:
        raise ValueError(f"training settings rejected: {err}") from err


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """What will be trained, decided before any expensive work."""

    teacher: str
    teacher_kind: str  # "ladder", "local" or "hub"
    teacher_params: int
    student_params: int
    student_shape: dict[str, int] | None
    choice: str  # how the sizes were chosen, for the table and the card


def make_plan(config: MinimaConfig) -> Plan:
    """Resolve the teacher and the student size from the config and the law; raise on anything impossible."""
    from hf_capgap.law import CapacityGapLaw, format_params

    law = CapacityGapLaw.load(config.law) if config.law else CapacityGapLaw.paper()
    rungs = _ladder_rungs(config)
    teacher = config.teacher
    if teacher is None:
        suggestion = law.suggest(config.student_params, [rung.params for rung in rungs.values()])
        teacher = next(name for name, rung in rungs.items() if rung.params == suggestion.teacher_params)
        choice = f"law ({law.source}) suggests {teacher} for a {format_params(config.student_params)} student"
    kind, teacher_params, teacher_meta = _resolve_teacher(config, teacher, rungs)
    _check_dataset(config)
    shape = config.student_shape
    if shape is not None:
        from hf_capgap.pruning import PruneShape, shape_params

        student_params = shape_params(teacher_meta, PruneShape.from_value(shape))
        choice = f"explicit student shape {shape}"
    elif config.student_params is not None:
        student_params = config.student_params
        if config.teacher is not None:
            choice = f"requested {format_params(student_params)} student"
    else:
        student_params = round(law.student_for(teacher_params).params)
        choice = f"law ({law.source}, {law.formula()}) picks a {format_params(student_params)} student"
    if student_params >= teacher_params:
        field_name = "student_* shape" if shape is not None else "student_params"
        raise ValueError(
            f"{field_name} gives {student_params:,} parameters but the teacher {teacher} has {teacher_params:,}; "
            "a pruned student must be smaller than its teacher."
        )
    if config.push_to_hub is not None:
        _require_hub("push_to_hub", config.push_to_hub, config.hub_endpoint)
    return Plan(teacher, kind, teacher_params, student_params, shape, choice)


def _ladder_rungs(config: MinimaConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """The ladder's rungs by name, for the preset's vocabulary (or the tokenizer's real size)."""
    from hf_capgap.pretraining import preset_rungs

    return {rung.name: rung for rung in preset_rungs(config.ladder, vocab_size)}


def _resolve_teacher(config: MinimaConfig, teacher: str, rungs: Mapping[str, Any]) -> tuple[str, int, Any]:
    """(kind, total parameters, model on the meta device) of the teacher, without loading weights."""
    from transformers import AutoConfig

    from hf_capgap.pretraining import PRETRAIN_PRESETS
    from hf_capgap.pruning_layouts import meta_model

    if teacher in rungs:
        seq_len = PRETRAIN_PRESETS[config.ladder].seq_len
        if config.seq_len > seq_len:
            raise ValueError(f"seq_len={config.seq_len} exceeds the {config.ladder} ladder's {seq_len}; set seq_len <= {seq_len}.")
        model = meta_model(rungs[teacher].config)
        return "ladder", rungs[teacher].params, model
    if Path(teacher).is_dir():
        kind = "local"
    elif teacher.startswith((".", "/", "~")) or teacher.count("/") != 1:
        raise ValueError(
            f"teacher={teacher!r} is neither a rung of the {config.ladder} ladder ({', '.join(rungs)}), "
            "an existing model folder, nor a Hub id 'namespace/name'; fix teacher."
        )
    else:
        kind = "hub"
        _require_hub("teacher", teacher, None)
    model = meta_model(AutoConfig.from_pretrained(teacher))
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.seq_len > positions:
        raise ValueError(f"seq_len={config.seq_len} exceeds the teacher's max_position_embeddings={positions}.")
    return kind, sum(p.numel() for p in model.parameters()), model


def _check_dataset(config: MinimaConfig) -> None:
    if config.dataset != EMBEDDED_DATASET and not Path(config.dataset).exists():
        _require_hub("dataset", config.dataset, None)


def _require_hub(key: str, name: str, endpoint: str | None) -> None:
    """Refuse a Hub name when the Hub cannot be used, naming the key that needs it."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ValueError(
            f"{key}={name!r} needs the Hugging Face Hub but HF_HUB_OFFLINE is set; unset it, or set {key} "
            "to something local (a ladder rung or a folder)."
        )
    url = urlparse(endpoint or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        raise ValueError(
            f"{key}={name!r} needs the Hub at {url.geturl()}, which is unreachable ({err}); connect, or use a local {key}."
        ) from None


# ---------------------------------------------------------------------------------------------- stages


@dataclass
class RunData:
    """The tokenized data every stage shares, fixed once so both students see identical tokens."""

    tokenizer: Any
    train: Any  # exactly the packed rows both students train on, in a fixed order
    eval: Any
    calibration: list[dict[str, Any]]


def _is_main() -> bool:
    from hf_capgap.processes import process_state

    return process_state().is_main_process


def _wait() -> None:
    from hf_capgap.processes import process_state

    process_state().wait_for_everyone()


def load_teacher_model(config: MinimaConfig, plan: Plan) -> tuple[Any, Any]:
    """The teacher and its tokenizer; a ladder rung is pretrained once (resumable), then reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_capgap.pretraining import ensure_ladder, load_teacher

    if plan.teacher_kind != "ladder":
        tokenizer = AutoTokenizer.from_pretrained(plan.teacher)
        return AutoModelForCausalLM.from_pretrained(plan.teacher, use_safetensors=True), tokenizer
    (path,) = ensure_ladder(config.ladder, config.ladder_dir, only=[plan.teacher])
    model, tokenizer, _ = load_teacher(path)
    return model, tokenizer


def prepare_data(config: MinimaConfig, tokenizer: Any) -> RunData:
    """Pack the corpus with the teacher's tokenizer; pick the training rows, held-out rows and calibration."""
    import datasets
    import torch

    from hf_capgap.data import load_corpus, tokenize_and_pack

    if config.dataset == EMBEDDED_DATASET:
        corpus = load_corpus()
    else:
        corpus = datasets.load_dataset(config.dataset, config.dataset_config)
        missing = {"train", "validation"} - set(corpus)
        if missing:
            raise ValueError(f"dataset={config.dataset!r} lacks split(s) {sorted(missing)}; it needs train and validation.")
    packed = tokenize_and_pack(corpus, tokenizer, config.seq_len)
    world = _world_size()
    steps = _steps(config)
    rows = steps * config.batch_size * config.gradient_accumulation_steps * world
    if rows > len(packed["train"]):
        raise ValueError(
            f"train_tokens={config.train_tokens} needs {rows} rows of {config.seq_len} tokens but the train split "
            f"packs into {len(packed['train'])}; lower train_tokens."
        )
    train = packed["train"].shuffle(seed=config.seed).select(range(rows)).flatten_indices()
    evaluation = packed["validation"].select(range(min(config.eval_rows, len(packed["validation"]))))
    calibration = [
        {"input_ids": torch.tensor(train[start : start + config.batch_size]["input_ids"], dtype=torch.long)}
        for start in range(0, min(rows, config.calibration_batches * config.batch_size), config.batch_size)
    ]
    return RunData(tokenizer, train, evaluation, calibration)


def _world_size() -> int:
    from hf_capgap.processes import process_state

    return process_state().num_processes


def _steps(config: MinimaConfig) -> int:
    per_step = config.batch_size * config.gradient_accumulation_steps * config.seq_len * _world_size()
    return max(1, config.train_tokens // per_step)


def prune_stage(
    config: MinimaConfig, plan: Plan, teacher: Any, data: RunData, teacher_fingerprint: str
) -> tuple[Any, Path, dict[str, Any]]:
    """Taylor-pruned student, saved once in the work folder and reused when its inputs match."""
    from transformers import AutoModelForCausalLM

    from hf_capgap.pruning import FORMAT_VERSION as PRUNED_VERSION
    from hf_capgap.pruning import MANIFEST_KIND, prune_model, save_pruned

    inputs = {"teacher": teacher_fingerprint, "student_params": plan.student_params, "shape": plan.student_shape,
              "layer_selection": config.layer_selection, "calibration": len(data.calibration),
              "data": dataset_fingerprint(data.train)}
    path = config.work_dir / f"pruned-{json_sha256(inputs)[:12]}"
    if _is_main() and not path.exists():
        student = prune_model(
            teacher,
            target_params=None if plan.student_shape else plan.student_params,
            shape=plan.student_shape,
            calibration=data.calibration,
            layer_selection=config.layer_selection,
        )
        save_pruned(student, path, teacher_name=plan.teacher, tokenizer=data.tokenizer)
    _wait()
    manifest = read_manifest(path, MANIFEST_KIND, PRUNED_VERSION,
                             expected={"teacher_fingerprint": teacher_fingerprint}, verify_files=True)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True), path, manifest


def _training_arguments(config: MinimaConfig, output_dir: Path, steps: int, args_class: type, **extra: Any) -> Any:
    """The optimizer and checkpoint settings both students share, so the comparison is like for like."""
    import torch

    from hf_capgap.processes import use_cpu

    return args_class(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=int(config.warmup_ratio * steps),
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        logging_steps=config.logging_steps,
        eval_strategy="no",
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=use_cpu(),
        **extra,
    )


def _distillation_arguments(config: MinimaConfig, output_dir: Path, steps: int, cache_path: Path | None) -> Any:
    from hf_capgap.config import DistillationConfig

    return _training_arguments(
        config, output_dir, steps, DistillationConfig,
        loss=config.loss, alpha=config.alpha, temperature=config.temperature, teacher_dtype=config.teacher_dtype,
        teacher_cache=None if cache_path is None else str(cache_path),
    )


def _train_resumably(trainer: Any, checkpoints: Path, final: Path, tokenizer: Any, fields: Mapping[str, Any]) -> None:
    """Train from the last checkpoint in ``checkpoints``, then publish the model at ``final`` in one rename."""
    from transformers.trainer_utils import get_last_checkpoint

    from hf_capgap.artifacts import write_manifest

    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    resumed_from = int(last.rsplit("-", 1)[1]) if last else None
    staging = final.with_name(f".{final.name}.partial")
    if _is_main():
        shutil.rmtree(staging, ignore_errors=True)
    _wait()
    trainer.save_model(str(staging))
    if _is_main():
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest records the settings
        tokenizer.save_pretrained(staging)
        write_manifest(
            staging, STAGE_KIND, FORMAT_VERSION,
            {**fields, "steps": trainer.state.global_step, "resumed_from_step": resumed_from},
        )
        os.replace(staging, final)
        shutil.rmtree(checkpoints, ignore_errors=True)
    _wait()


def _finished(path: Path, inputs: Mapping[str, Any]) -> bool:
    if not path.exists():
        return False
    read_manifest(path, STAGE_KIND, FORMAT_VERSION, expected={"inputs_sha256": json_sha256(inputs)}, verify_files=True)
    return True


def distill_stage(config: MinimaConfig, teacher: Any, pruned_dir: Path, data: RunData, teacher_fingerprint: str) -> Path:
    """Distil the pruned student (online teacher or a TeacherCache); resumable; returns the model folder."""
    from transformers import AutoModelForCausalLM

    from hf_capgap.cache import TeacherCache
    from hf_capgap.trainer import DistillationTrainer

    inputs = {"stage": "distill", "pruned": pruned_dir.name, "teacher": teacher_fingerprint,
              "settings": config.result_settings()}
    tag = json_sha256(inputs)[:12]
    final = config.work_dir / f"distilled-{tag}"
    if _finished(final, inputs):
        return final
    cache_path = None
    if config.teacher_cache:
        cache_inputs = [teacher_fingerprint, dataset_fingerprint(data.train), config.cache_mode, config.cache_k,
                        config.temperature]
        cache_path = config.work_dir / f"cache-{json_sha256(cache_inputs)[:12]}"
        TeacherCache.build(teacher, data.train, cache_path, mode=config.cache_mode, k=config.cache_k,
                           temperature=config.temperature, batch_size=config.eval_batch_size, tokenizer=data.tokenizer)
    checkpoints = config.work_dir / f"distill-{tag}"
    args = _distillation_arguments(config, checkpoints, _steps(config), cache_path)
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(pruned_dir, use_safetensors=True),
        teacher_model=None if cache_path else teacher,
        args=args,
        train_dataset=data.train,
        processing_class=data.tokenizer,
        teacher_processing_class=None if cache_path else data.tokenizer,
    )
    _train_resumably(trainer, checkpoints, final, data.tokenizer, {"inputs_sha256": json_sha256(inputs)})
    return final


def scratch_stage(config: MinimaConfig, pruned_dir: Path, data: RunData) -> Path:
    """The baseline: the student's architecture from random init, plain CE, same rows and optimizer."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Trainer,
        TrainingArguments,
    )

    from hf_capgap.collate import CausalLMCollator

    inputs = {"stage": "scratch", "pruned": pruned_dir.name, "settings": config.result_settings()}
    tag = json_sha256(inputs)[:12]
    final = config.work_dir / f"scratch-{tag}"
    if _finished(final, inputs):
        return final
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pruned_dir))
    checkpoints = config.work_dir / f"scratch-checkpoints-{tag}"
    trainer = Trainer(
        model=model,
        args=_training_arguments(config, checkpoints, _steps(config), TrainingArguments),
        train_dataset=data.train,
        data_collator=CausalLMCollator(pad_token_id=data.tokenizer.pad_token_id or 0),
        processing_class=data.tokenizer,
    )
    _train_resumably(trainer, checkpoints, final, data.tokenizer, {"inputs_sha256": json_sha256(inputs)})
    return final


# ---------------------------------------------------------------------------------------------- report + export

ROWS = (("teacher", "teacher"), ("pruned", "pruned student, before distillation"),
        ("distilled", "distilled student"), ("scratch", "same-size student from scratch, same tokens"))


def format_table(results: Mapping[str, Any]) -> str:
    """The table a user reads to see what distillation bought."""
    lines = [f"MiniMA run {results['run_name']}: {results['choice']}",
             f"{'model':<46}{'params':>12}{'loss':>9}{'ppl':>10}"]
    for key, label in ROWS:
        score = results["eval"][key]
        lines.append(f"{label:<46}{score['params']:>12,}{score['loss']:>9.4f}{score['perplexity']:>10.2f}")
    gain = results["eval"]["scratch"]["loss"] - results["eval"]["distilled"]["loss"]
    tokens = f"{results['train_tokens']:,} tokens each"
    if gain > 0:
        lines.append(f"distillation beat training from scratch by {gain:.4f} nats of held-out loss ({tokens}).")
    else:
        lines.append(f"distillation did NOT beat training from scratch at this scale ({-gain:.4f} nats worse, {tokens}).")
    return "\n".join(lines)


def evaluate_models(config: MinimaConfig, models: Mapping[str, Any], eval_rows: Any) -> dict[str, dict[str, float]]:
    from hf_capgap.evaluation import evaluate_perplexity

    scores = {}
    for key, model in models.items():
        result = evaluate_perplexity(model, eval_rows, batch_size=config.eval_batch_size)
        scores[key] = {"loss": result["eval_loss"], "perplexity": result["perplexity"],
                       "params": sum(p.numel() for p in model.parameters())}
    return scores


def export_run(config: MinimaConfig, plan: Plan, results: Mapping[str, Any], distilled_dir: Path) -> None:
    """Write the Hub-ready student folder (weights, tokenizer, card, law plot, results.json) in one rename."""
    from transformers import AutoConfig

    from hf_capgap.artifacts import write_manifest
    from hf_capgap.hub import (
        HeldOutScore,
        PruningShape,
        StudentCardInfo,
        TrainingSetup,
        write_model_card,
    )

    law = _law(config)
    student_config = AutoConfig.from_pretrained(distilled_dir)
    scores = {key: HeldOutScore(value["loss"], value["perplexity"]) for key, value in results["eval"].items()}
    with atomic_directory(config.run_dir, overwrite=True) as tmp:
        for item in distilled_dir.iterdir():
            if item.is_file() and item.name != MANIFEST_NAME:
                shutil.copy2(item, tmp / item.name)
        plot = config.work_dir / "law.png"
        law.plot(plot, mark=(results["eval"]["distilled"]["params"], plan.teacher_params))
        info = StudentCardInfo(
            model_name=config.run_name,
            teacher=plan.teacher,
            teacher_params=plan.teacher_params,
            student_params=results["eval"]["distilled"]["params"],
            law=law.to_dict(),
            pruning=PruningShape(
                hidden_size=student_config.hidden_size,
                num_layers=student_config.num_hidden_layers,
                num_heads=student_config.num_attention_heads,
                num_kv_heads=getattr(student_config, "num_key_value_heads", student_config.num_attention_heads),
                intermediate_size=student_config.intermediate_size,
                kept_fraction=results["kept_fraction"],
            ),
            training=TrainingSetup(
                loss=f"{1 - config.alpha:g} x LM cross-entropy + {config.alpha:g} x {config.loss}",
                alpha=config.alpha, temperature=config.temperature, learning_rate=config.learning_rate,
                steps=results["steps"], tokens=results["train_tokens"], batch_size=config.batch_size,
                seq_len=config.seq_len,
            ),
            teacher_eval=scores["teacher"],
            pruned_eval=scores["pruned"],
            distilled_eval=scores["distilled"],
            scratch_eval=scores["scratch"],
            eval_dataset=EMBEDDED_DATASET_NAME if config.dataset == EMBEDDED_DATASET else config.dataset,
            law_plot=str(plot),
        )
        write_model_card(tmp, info)
        atomic_write_json(tmp / "results.json", results)
        write_manifest(tmp, RUN_KIND, FORMAT_VERSION, {"settings_sha256": json_sha256(config.result_settings())})


def _law(config: MinimaConfig) -> Any:
    from hf_capgap.law import CapacityGapLaw

    return CapacityGapLaw.load(config.law) if config.law else CapacityGapLaw.paper()


def finished_results(config: MinimaConfig) -> dict[str, Any] | None:
    """results.json of a complete export made from these settings; None if there is none yet."""
    if not config.run_dir.exists():
        return None
    try:
        read_manifest(config.run_dir, RUN_KIND, FORMAT_VERSION,
                      expected={"settings_sha256": json_sha256(config.result_settings())}, verify_files=True)
    except ArtifactError as err:
        raise ValueError(
            f"{config.run_dir} holds another run ({err}); choose another run_name or remove that folder."
        ) from None
    return json.loads((config.run_dir / "results.json").read_text())


def run_minima(config: MinimaConfig) -> dict[str, Any]:
    """Run (or resume, or reprint) the whole recipe; returns the results written to results.json."""
    from hf_capgap.artifacts import model_fingerprint

    plan = make_plan(config)
    results = finished_results(config)
    if results is None:
        teacher, tokenizer = load_teacher_model(config, plan)
        data = prepare_data(config, tokenizer)
        fingerprint = model_fingerprint(teacher)
        pruned, pruned_dir, pruned_manifest = prune_stage(config, plan, teacher, data, fingerprint)
        distilled_dir = distill_stage(config, teacher, pruned_dir, data, fingerprint)
        scratch_dir = scratch_stage(config, pruned_dir, data)
        if _is_main():
            from transformers import AutoModelForCausalLM

            models = {"teacher": teacher, "pruned": pruned,
                      "distilled": AutoModelForCausalLM.from_pretrained(distilled_dir, use_safetensors=True),
                      "scratch": AutoModelForCausalLM.from_pretrained(scratch_dir, use_safetensors=True)}
            results = {"run_name": config.run_name, "teacher": plan.teacher, "choice": plan.choice,
                       "train_tokens": _steps(config) * config.batch_size * config.gradient_accumulation_steps
                       * config.seq_len * _world_size(),
                       "steps": _steps(config), "eval_rows": len(data.eval),
                       "kept_fraction": pruned_manifest["kept_fraction"],
                       "eval": evaluate_models(config, models, data.eval), "settings": config.result_settings()}
            export_run(config, plan, results, distilled_dir)
        _wait()
        results = finished_results(config)
    if _is_main():
        print(format_table(results))
        if config.push_to_hub is not None:
            from hf_capgap.hub import push_student

            url = push_student(config.run_dir, config.push_to_hub, private=config.hub_private,
                               endpoint=config.hub_endpoint)
            print(f"pushed to {url}")
    return results
