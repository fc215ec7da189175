"""MinimaConfig: every setting of a MiniMA run, its help text, and the one way to read it.

The dataclass defaults *are* the tiny CPU preset (``recipes/configs/minima_tiny.yaml`` repeats them),
so the default run needs no file. ``parse_minima_args(["run.yaml", "--key", "value"])`` reads a YAML
preset and command-line overrides through ``transformers.HfArgumentParser``, which also gives
``--help`` with every field. Checks here only read the settings: no model, dataset or
``TrainingArguments`` is built (under DeepSpeed ZeRO-3 building one would partition every model
loaded afterwards, teacher included).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


EMBEDDED_DATASET = "embedded"
STUDENT_SHAPE_FIELDS = ("student_hidden_size", "student_num_layers", "student_num_heads", "student_intermediate_size")
# Fields that change neither what is trained nor what is exported: a run differing only here is the same run.
NON_RESULT_FIELDS = ("push_to_hub", "hub_endpoint", "hub_private", "logging_steps", "save_steps", "dry_run", "prune_only",
                     "accelerate_config", "teacher_hub_id", "license")
NULL_WORDS = ("null", "none", "")
CACHE_MODES = ("topk", "sampled", "dense")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


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
    teacher_revision: str | None = field(default=None, metadata=_help("Hub revision (branch, tag or commit) of the teacher."))
    teacher_hub_id: str | None = field(
        default=None,
        metadata=_help(
            "The teacher's Hub id for the model card's base_model when `teacher` is a local folder whose "
            "config does not name one; null: taken from the teacher (a Hub teacher, or its config's _name_or_path)."
        ),
    )
    license: str | None = field(
        default=None,
        metadata=_help("License of the student for its card (a student inherits its teacher's terms); null: "
                       "the teacher's card/config license, or left for you to fill in (with a warning)."),
    )
    trust_remote_code: bool = field(default=False, metadata=_help("Run the teacher's own modelling code (off unless asked)."))
    student_params: str | None = field(
        default="170K",
        metadata=_help("Student size in total parameters (170000, 60M, 1.5B, 2e9). null: the law's best student "
                       "for the teacher (student_for)."),
    )
    student_init: str | None = field(
        default=None,
        metadata=_help("A folder holding an existing student (e.g. from `hf-capgap prune`): distillation starts from "
                       "it and the prune stage is skipped. Required for multi-process launches."),
    )
    law: str | None = field(default=None, metadata=_help("A law.json from `hf-capgap law fit`; null uses the paper's t* = 2.5 s."))
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
    calibration_batches: int = field(default=4, metadata=_help("Train batches (of batch_size rows) for the Taylor importance scores."))
    dataset: str = field(
        default=EMBEDDED_DATASET,
        metadata=_help(
            "'embedded' (the packaged corpus), a Hub dataset name, or local files: a .json/.jsonl/.parquet/.txt "
            "file, a glob of them, or a folder holding them. Rows carry `dataset_text_field` text or chat `messages`."
        ),
    )
    dataset_config: str | None = field(default=None, metadata=_help("Configuration name of a Hub `dataset`."))
    dataset_revision: str | None = field(default=None, metadata=_help("Hub revision of `dataset`."))
    dataset_split: str = field(default="train", metadata=_help("Split the students train on."))
    eval_split: str | None = field(
        default="validation",
        metadata=_help("Held-out split; null (or a dataset without it): the first eval_rows packed rows of "
                       "dataset_split are held out and never trained on."),
    )
    dataset_text_field: str = field(default="text", metadata=_help("Column holding the text (rows with `messages` "
                                                                      "are rendered with the tokenizer's chat template)."))
    streaming: bool = field(
        default=False,
        metadata=_help("Read the dataset as a datasets.IterableDataset: tokenized and packed on the fly, never "
                       "downloaded or held whole; the run's identity is the dataset's name, files, split and seed."),
    )
    seq_len: int | None = field(default=128, metadata=_help("Tokens per packed training row; null: the teacher's "
                                                            "max_position_embeddings."))
    batch_size: int = field(default=16, metadata=_help("Rows per device per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    train_tokens: str = field(
        default="409600", metadata=_help("Tokens each student trains on (409600, 100M, 126B, 2e9), all processes together.")
    )
    learning_rate: float = field(default=3e-3, metadata=_help("Peak AdamW learning rate (MiniMA on LLaMA-2: 3e-4)."))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("transformers scheduler name."))
    warmup_ratio: float = field(default=0.01, metadata=_help("Fraction of steps spent warming up (MiniMA: 1 percent)."))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.95, metadata=_help("AdamW beta2."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm."))
    bf16: bool = field(default=False, metadata=_help("Train in bf16 mixed precision (GPUs)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in the backward pass "
                                                                       "(students and Taylor scoring)."))
    loss: str = field(default="forward_kl", metadata=_help("Divergence (DistillationConfig.loss); MiniMA: forward_kl."))
    alpha: float = field(default=0.5, metadata=_help("Weight of the divergence; 1 - alpha weights LM cross-entropy."))
    temperature: float = field(default=1.0, metadata=_help("Softmax temperature of the divergence."))
    teacher_dtype: str = field(default="auto", metadata=_help("dtype of the frozen teacher: auto (bf16 on a GPU, "
                                                              "float32 on a CPU), bfloat16, float16 or float32."))
    teacher_cache: bool = field(
        default=False, metadata=_help("Precompute the teacher's top-k signal once (TeacherCache) instead of running it online.")
    )
    cache_mode: str = field(default="topk", metadata=_help("TeacherCache mode: topk, sampled or dense."))
    cache_k: int = field(default=64, metadata=_help("Logits kept per position by the cache (topk/sampled)."))
    cache_sampler: str = field(default="systematic", metadata=_help("How a sampled cache draws: systematic (one "
                                                                   "uniform per position) or multinomial."))
    baseline: bool = field(
        default=True,
        metadata=_help("Also train the same-size student from scratch on the same tokens (the comparison the "
                       "table and card report); off in the GPU presets, where it would double the training."),
    )
    eval_rows: int = field(default=256, metadata=_help("Held-out packed rows every model is scored on."))
    eval_batch_size: int = field(default=16, metadata=_help("Rows per device per evaluation forward pass."))
    save_steps: int = field(default=50, metadata=_help("Trainer checkpoint interval (what a killed run resumes from)."))
    logging_steps: int = field(default=25, metadata=_help("Trainer logging interval."))
    seed: int = field(default=0, metadata=_help("Seed of data order, calibration and initialisation."))
    push_to_hub: str | None = field(default=None, metadata=_help("Hub repo id ('namespace/name') to push the student to."))
    hub_endpoint: str | None = field(default=None, metadata=_help("Hub URL, e.g. a private Hub; null uses huggingface.co."))
    hub_private: bool = field(default=False, metadata=_help("Create the Hub repo as private."))
    dry_run: bool = field(
        default=False,
        metadata=_help("Resolve the plan on the meta device and print shapes, parameter counts, the law, tokens, "
                       "steps, global batch and a per-GPU memory estimate; load, download and train nothing."),
    )
    prune_only: bool = field(
        default=False,
        metadata=_help("Run only the prune stage (one process) and print the pruned folder, for a later "
                       "multi-process launch with --student_init."),
    )
    accelerate_config: str | None = field(
        default=None,
        metadata=_help("accelerate config YAML the dry run estimates memory for (DDP / FSDP / ZeRO-3, process "
                       "count, use_cpu, mixed_precision); null: the launch this process runs under."),
    )

    def __post_init__(self) -> None:
        # HfArgumentParser rewrites field.type to the inner type of Optional fields: read the annotations.
        for name, hint in typing.get_type_hints(MinimaConfig).items():
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in NULL_WORDS and type(None) in typing.get_args(hint):
                setattr(self, name, None)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def work_dir(self) -> Path:
        return Path(self.output_dir) / ".work" / self.run_name

    @property
    def student_param_count(self) -> int | None:
        return None if self.student_params is None else _count("student_params", self.student_params)

    @property
    def train_token_count(self) -> int:
        return _count("train_tokens", self.train_tokens)

    @property
    def student_shape(self) -> dict[str, int] | None:
        values = [getattr(self, name) for name in STUDENT_SHAPE_FIELDS]
        if all(value is None for value in values):
            return None
        hidden, layers, heads, intermediate = values
        return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                "intermediate_size": intermediate}

    def result_settings(self) -> dict[str, Any]:
        """The fields that decide the exported student (the run's identity), sizes as plain numbers."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in NON_RESULT_FIELDS}
        values["student_params"] = self.student_param_count
        values["train_tokens"] = self.train_token_count
        return values


def _count(key: str, value: str | int) -> int:
    from hf_capgap.law import parse_params

    try:
        number = parse_params(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a count; write it like 170000, 60M, 1.5B or 2e9.") from None
    if number < 1 or not math.isfinite(number):
        raise ValueError(f"{key}={value!r} must be a positive count.")
    return round(number)


# ---------------------------------------------------------------------------------------------- reading


DESCRIPTION = "The MiniMA recipe: law -> prune -> distill -> evaluate -> export."


def parse_minima_args(argv: Sequence[str] = ()) -> MinimaConfig:
    """``[CONFIG.yaml] [--key value ...]`` -> a checked :class:`MinimaConfig` (no file: the tiny preset)."""
    from hf_capgap.utils.recipe_args import read_preset, split_preset

    preset, overrides = split_preset(argv)
    return _parse({} if preset is None else read_preset(preset, [MinimaConfig]), overrides)


def build_config(values: Mapping[str, Any]) -> MinimaConfig:
    """A checked config from a mapping (tests, notebooks); unknown keys and bad values raise ValueError."""
    from hf_capgap.utils.recipe_args import known_values

    return _parse(known_values(values, [MinimaConfig], "config"), [])


def _parse(values: Mapping[str, Any], argv: list[str]) -> MinimaConfig:
    from hf_capgap.utils.recipe_args import parse_with_preset

    (config,) = parse_with_preset([MinimaConfig], values, argv, description=DESCRIPTION)
    _check_types(config)
    check_values(config)
    return config


def _check_types(config: MinimaConfig) -> None:
    """argparse types string values only; a YAML number or list where the field wants another type stops here."""
    hints = typing.get_type_hints(MinimaConfig)
    for item in dataclasses.fields(config):
        value, options = getattr(config, item.name), typing.get_args(hints[item.name]) or (hints[item.name],)
        if value is None and type(None) in options:
            continue
        expected = next(option for option in options if option is not type(None))
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            wanted = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[expected]
            raise ValueError(f"{item.name}={value!r} is not {wanted}; set {item.name} to {wanted}.")


def check_values(config: MinimaConfig) -> None:
    """Reject impossible settings by field name; nothing is loaded, built or trained here."""
    from hf_capgap.cache.format import SAMPLERS
    from hf_capgap.ladder import LADDERS
    from hf_capgap.losses import DIVERGENCES
    from hf_capgap.pruning import LAYER_SELECTIONS
    from hf_capgap.models import TEACHER_DTYPE_CHOICES

    positive = ("batch_size", "gradient_accumulation_steps", "calibration_batches", "eval_rows", "eval_batch_size",
                "save_steps", "logging_steps", "cache_k")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be >= 1.")
    if config.seq_len is not None and config.seq_len < 2:
        raise ValueError(f"seq_len={config.seq_len} must be >= 2 (a row predicts its next tokens).")
    tokens = config.train_token_count
    if config.seq_len is not None and tokens < config.batch_size * config.gradient_accumulation_steps * config.seq_len:
        raise ValueError(
            f"train_tokens={config.train_tokens} is less than one optimizer step "
            f"(batch_size*gradient_accumulation_steps*seq_len); raise train_tokens."
        )
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise ValueError(f"learning_rate={config.learning_rate} must be a positive number.")
    if not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio={config.warmup_ratio} must be in [0, 1).")
    if config.lr_scheduler_type not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler_type={config.lr_scheduler_type!r} must be one of {', '.join(LR_SCHEDULERS)}.")
    if config.loss not in DIVERGENCES:
        raise ValueError(f"loss={config.loss!r} must be one of {', '.join(DIVERGENCES)}.")
    if not 0 <= config.alpha <= 1:
        raise ValueError(f"alpha={config.alpha} must be in [0, 1] (the weight of the divergence).")
    if not config.temperature > 0:
        raise ValueError(f"temperature={config.temperature} must be > 0.")
    if config.teacher_dtype not in TEACHER_DTYPE_CHOICES:
        raise ValueError(f"teacher_dtype={config.teacher_dtype!r} must be one of {TEACHER_DTYPE_CHOICES}.")
    if config.ladder not in LADDERS:
        raise ValueError(f"ladder={config.ladder!r} is unknown; choose one of {sorted(LADDERS)}.")
    if config.layer_selection not in LAYER_SELECTIONS:
        raise ValueError(f"layer_selection={config.layer_selection!r} must be one of {LAYER_SELECTIONS}.")
    if config.cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={config.cache_mode!r} must be topk, sampled or dense.")
    if config.cache_mode == "sampled" and config.loss != "forward_kl":
        raise ValueError(f"cache_mode='sampled' estimates forward_kl only; got loss={config.loss!r}.")
    if config.cache_sampler not in SAMPLERS:
        raise ValueError(f"cache_sampler={config.cache_sampler!r} must be one of {SAMPLERS}.")
    if config.teacher_cache and config.streaming:
        raise ValueError("teacher_cache needs a fixed set of training rows; set streaming: false or teacher_cache: false.")
    if not config.run_name or "/" in config.run_name or config.run_name.startswith("."):
        raise ValueError(f"run_name={config.run_name!r} must be a plain folder name such as 'minima-tiny'.")
    if config.teacher is None and config.student_params is None:
        raise ValueError("set teacher (a ladder rung, folder or Hub id) or student_params (the law picks the teacher).")
    config.student_param_count  # noqa: B018 - parses, raising on a bad count
    shape = [getattr(config, name) for name in STUDENT_SHAPE_FIELDS]
    if any(value is None for value in shape) and any(value is not None for value in shape):
        raise ValueError(f"give all of {', '.join(STUDENT_SHAPE_FIELDS)} or none of them.")
    if config.student_shape is not None and config.student_params is not None:
        raise ValueError("set either student_params or the student_* shape fields, not both (student_params: null).")
    if config.student_shape is not None and min(shape) < 1:
        raise ValueError(f"student shape {config.student_shape} must hold positive sizes.")
    if config.student_init is not None and not (Path(config.student_init) / "config.json").is_file():
        raise FileNotFoundError(
            f"student_init={config.student_init} holds no config.json; point it at a saved student folder "
            "(e.g. written by `hf-capgap prune`)."
        )
    if config.push_to_hub is not None and "/" not in config.push_to_hub:
        raise ValueError(f"push_to_hub={config.push_to_hub!r} must be 'namespace/name'.")
    if config.teacher_hub_id is not None and config.teacher_hub_id.count("/") != 1:
        raise ValueError(f"teacher_hub_id={config.teacher_hub_id!r} must be a Hub id 'namespace/name'.")
    if config.law is not None and not Path(config.law).is_file():
        raise FileNotFoundError(f"law={config.law} does not exist; write one with `hf-capgap law fit` or set law: null.")
    if config.accelerate_config is not None and not Path(config.accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate_config={config.accelerate_config} does not exist.")
