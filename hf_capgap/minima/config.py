"""MinimaConfig: every setting of a MiniMA run, its help text, and the one way to read it.

The dataclass defaults *are* the tiny CPU preset (``recipes/configs/minima_tiny.yaml`` repeats them),
so the default run needs no file. ``parse_minima_args(["run.yaml", "--key", "value"])`` reads a YAML
preset and command-line overrides through ``transformers.HfArgumentParser``, which also gives
``--help`` with every field; :mod:`hf_capgap.minima.arguments` reads and checks it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.trainer.settings import OnPolicySettings, TaidSettings, TeacherCacheSettings
from hf_capgap.utils.recipe_args import field_help

EMBEDDED_DATASET = "embedded"
STUDENT_SHAPE_FIELDS = ("student_hidden_size", "student_num_layers", "student_num_heads", "student_intermediate_size")
# Fields that change neither what is trained nor what is exported: a run differing only here is the same run.
NON_RESULT_FIELDS = (
    "push_to_hub",
    "hub_endpoint",
    "hub_private",
    "logging_steps",
    "save_steps",
    "dry_run",
    "prune_only",
    "accelerate_config",
    "teacher_hub_id",
    "license",
)
# Settings that exist only for a choice: dropped from the run's identity while that choice is off, so a run
# without them keeps the identity (stage folders, results.json settings) it had before they were added.
TAID_FIELDS = ("taid_t_start", "taid_t_end", "taid_alpha", "taid_beta")
ON_POLICY_TRAINER_FIELDS = tuple(item.name for item in dataclasses.fields(OnPolicySettings))  # DistillationConfig's
ON_POLICY_FIELDS = (*ON_POLICY_TRAINER_FIELDS, "prompt_tokens")
ASSISTANT_FIELDS = ("assistants", "assistant_tokens")
NO_ASSISTANTS = "none"
AUTO_ASSISTANTS = "auto"
NULL_WORDS = ("null", "none", "")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


@dataclass
class MinimaConfig(TeacherCacheSettings, TaidSettings, OnPolicySettings):
    """Everything a MiniMA run needs; YAML keys and ``--key value`` overrides use these names.

    The distillation settings (loss, alpha, temperature, teacher_dtype, cache_k, cache_sampler) are
    inherited from :class:`TeacherCacheSettings`, shared with DistillationConfig and SweepConfig; TAID's
    schedule (taid_*, used with ``loss: taid``) from :class:`TaidSettings`; GKD's on-policy settings (lmbda,
    seq_kd, max_completion_length, sampling; online teacher, map-style data) from :class:`OnPolicySettings`.
    """

    run_name: str = field(default="minima-tiny", metadata=field_help("Folder name of the run under output_dir."))
    output_dir: str = field(default="outputs", metadata=field_help("Where the exported run and its .work/ stages go."))
    teacher: str | None = field(
        default=None,
        metadata=field_help(
            "A rung name of `ladder` (pretrained on first use, then reused), a local model folder, or a Hub "
            "model id. null: choose the ladder rung the law suggests for `student_params`."
        ),
    )
    teacher_revision: str | None = field(
        default=None, metadata=field_help("Hub revision (branch, tag or commit) of the teacher.")
    )
    teacher_hub_id: str | None = field(
        default=None,
        metadata=field_help(
            "The teacher's Hub id for the model card's base_model when `teacher` is a local folder whose "
            "config does not name one; null: taken from the teacher (a Hub teacher, or its config's _name_or_path)."
        ),
    )
    license: str | None = field(
        default=None,
        metadata=field_help(
            "License of the student for its card (a student inherits its teacher's terms); null: "
            "the teacher's card/config license, or left for you to fill in (with a warning)."
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=field_help("Run the teacher's own modelling code (off unless asked).")
    )
    student_params: str | None = field(
        default="170K",
        metadata=field_help(
            "Student size in total parameters (170000, 60M, 1.5B, 2e9). null: the law's best student "
            "for the teacher (student_for)."
        ),
    )
    student_init: str | None = field(
        default=None,
        metadata=field_help(
            "A folder holding an existing student (e.g. from `hf-capgap prune`): distillation starts from "
            "it and the prune stage is skipped. Required for multi-process launches."
        ),
    )
    assistants: str = field(
        default=NO_ASSISTANTS,
        metadata=field_help(
            "Teacher assistants between teacher and student (TAKD): 'none' distils the student from the teacher; "
            "'auto' plans them with the law (CapacityGapLaw.chain); or sizes, largest first (300K,150K or a YAML "
            "list). Each is pruned from the model above it and distilled from it; the student from the last."
        ),
    )
    assistant_tokens: str | None = field(
        default=None,
        metadata=field_help("Tokens each assistant is distilled on (like train_tokens); null: train_tokens."),
    )
    law: str | None = field(
        default=None, metadata=field_help("A law.json from `hf-capgap law fit`; null uses the paper's t* = 2.5 s.")
    )
    ladder: str = field(
        default="tiny", metadata=field_help("Ladder preset (hf_capgap.ladder.LADDERS) the teacher rungs come from.")
    )
    ladder_dir: str = field(
        default="outputs/ladder/tiny", metadata=field_help("Folder holding the pretrained ladder teachers.")
    )
    student_hidden_size: int | None = field(
        default=None, metadata=field_help("Explicit student width (all four student_* or none).")
    )
    student_num_layers: int | None = field(default=None, metadata=field_help("Explicit student depth."))
    student_num_heads: int | None = field(default=None, metadata=field_help("Explicit student attention heads."))
    student_intermediate_size: int | None = field(default=None, metadata=field_help("Explicit student MLP width."))
    layer_selection: str = field(
        default="score",
        metadata=field_help(
            "Which layers survive: 'score' (Taylor gate scores) or 'middle' (MiniMA dropped the ends)."
        ),
    )
    calibration_batches: int = field(
        default=4, metadata=field_help("Train batches (of batch_size rows) for the Taylor importance scores.")
    )
    dataset: str = field(
        default=EMBEDDED_DATASET,
        metadata=field_help(
            "'embedded' (the packaged corpus), a Hub dataset name, or local files: a .json/.jsonl/.parquet/.txt "
            "file, a glob of them, or a folder holding them. Rows carry `dataset_text_field` text or chat `messages`."
        ),
    )
    dataset_config: str | None = field(default=None, metadata=field_help("Configuration name of a Hub `dataset`."))
    dataset_revision: str | None = field(default=None, metadata=field_help("Hub revision of `dataset`."))
    dataset_split: str = field(default="train", metadata=field_help("Split the students train on."))
    eval_split: str | None = field(
        default="validation",
        metadata=field_help(
            "Held-out split; null (or a dataset without it): the first eval_rows packed rows of "
            "dataset_split are held out and never trained on."
        ),
    )
    dataset_text_field: str = field(
        default="text",
        metadata=field_help(
            "Column holding the text (rows with `messages` are rendered with the tokenizer's chat template)."
        ),
    )
    streaming: bool = field(
        default=False,
        metadata=field_help(
            "Read the dataset as a datasets.IterableDataset: tokenized and packed on the fly, never "
            "downloaded or held whole; the run's identity is the dataset's name, files, split and seed."
        ),
    )
    seq_len: int | None = field(
        default=128,
        metadata=field_help("Tokens per packed training row; null: the teacher's max_position_embeddings."),
    )
    batch_size: int = field(default=16, metadata=field_help("Rows per device per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=field_help("Micro-batches per optimizer step."))
    train_tokens: str = field(
        default="409600",
        metadata=field_help("Tokens each student trains on (409600, 100M, 126B, 2e9), all processes together."),
    )
    learning_rate: float = field(
        default=3e-3, metadata=field_help("Peak AdamW learning rate (MiniMA on LLaMA-2: 3e-4).")
    )
    lr_scheduler_type: str = field(default="cosine", metadata=field_help("transformers scheduler name."))
    warmup_ratio: float = field(
        default=0.01, metadata=field_help("Fraction of steps spent warming up (MiniMA: 1 percent).")
    )
    weight_decay: float = field(default=0.1, metadata=field_help("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=field_help("AdamW beta1."))
    adam_beta2: float = field(default=0.95, metadata=field_help("AdamW beta2."))
    max_grad_norm: float = field(default=1.0, metadata=field_help("Gradient clipping norm."))
    bf16: bool = field(default=False, metadata=field_help("Train in bf16 mixed precision (GPUs)."))
    gradient_checkpointing: bool = field(
        default=False, metadata=field_help("Recompute activations in the backward pass (students and Taylor scoring).")
    )
    prompt_tokens: int = field(
        default=32,
        metadata=field_help(
            "On-policy (lmbda > 0 or seq_kd): each packed row's first prompt_tokens tokens are its prompt (alone at "
            "lmbda 1, else with the row's next max_completion_length tokens as completion). A row then counts "
            "prompt_tokens + max_completion_length tokens of train_tokens (steps, results and card alike)."
        ),
    )
    teacher_cache: bool = field(
        default=False,
        metadata=field_help("Precompute the teacher's top-k signal once (TeacherCache) instead of running it online."),
    )
    cache_mode: str = field(default="topk", metadata=field_help("TeacherCache mode: topk, sampled or dense."))
    baseline: bool = field(
        default=True,
        metadata=field_help(
            "Also train the same-size student from scratch on the same tokens (the comparison the "
            "table and card report); off in the GPU presets, where it would double the training."
        ),
    )
    eval_rows: int = field(default=256, metadata=field_help("Held-out packed rows every model is scored on."))
    eval_batch_size: int = field(default=16, metadata=field_help("Rows per device per evaluation forward pass."))
    save_steps: int = field(
        default=50, metadata=field_help("Trainer checkpoint interval (what a killed run resumes from).")
    )
    logging_steps: int = field(default=25, metadata=field_help("Trainer logging interval."))
    seed: int = field(default=0, metadata=field_help("Seed of data order, calibration and initialisation."))
    push_to_hub: str | None = field(
        default=None, metadata=field_help("Hub repo id ('namespace/name') to push the student to.")
    )
    hub_endpoint: str | None = field(
        default=None, metadata=field_help("Hub URL, e.g. a private Hub; null uses huggingface.co.")
    )
    hub_private: bool = field(default=False, metadata=field_help("Create the Hub repo as private."))
    dry_run: bool = field(
        default=False,
        metadata=field_help(
            "Resolve the plan on the meta device and print shapes, parameter counts, the law, tokens, "
            "steps, global batch and a per-GPU memory estimate; load, download and train nothing."
        ),
    )
    prune_only: bool = field(
        default=False,
        metadata=field_help(
            "Run only the prune stage (one process) and print the pruned folder, for a later "
            "multi-process launch with --student_init."
        ),
    )
    accelerate_config: str | None = field(
        default=None,
        metadata=field_help(
            "accelerate config YAML the dry run estimates memory for (DDP / FSDP / ZeRO-3, process "
            "count, use_cpu, mixed_precision); null: the launch this process runs under."
        ),
    )

    def __post_init__(self) -> None:
        if isinstance(self.assistants, list | tuple):  # a YAML list of sizes
            self.assistants = ",".join(str(size) for size in self.assistants)
        elif isinstance(self.assistants, int | float) and not isinstance(self.assistants, bool):
            self.assistants = str(self.assistants)
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
    def assistant_token_count(self) -> int:
        """Tokens each assistant is distilled on: ``assistant_tokens``, else the student's ``train_tokens``."""
        if self.assistant_tokens is None:
            return self.train_token_count
        return _count("assistant_tokens", self.assistant_tokens)

    @property
    def assistant_sizes(self) -> tuple[float, ...] | None:
        """The listed assistant sizes, largest first; None for 'none' or 'auto' (planned from the teacher)."""
        word = self.assistants.strip().lower()
        if word in (NO_ASSISTANTS, AUTO_ASSISTANTS):
            return None
        from hf_capgap.law import parse_params

        sizes = []
        for item in self.assistants.split(","):
            try:
                size = parse_params(item.strip())
            except (TypeError, ValueError):
                size = math.nan
            if not (math.isfinite(size) and size >= 1):
                raise ConfigError(
                    f"assistants={self.assistants!r}: {item.strip()!r} is not a size; write 'none', 'auto' or "
                    "sizes largest first such as 300K,150K."
                )
            sizes.append(float(size))
        if any(later >= earlier for earlier, later in zip(sizes, sizes[1:], strict=False)):
            raise ConfigError(
                f"assistants={self.assistants!r} must list distinct sizes in decreasing order, from the teacher "
                "down to the student (e.g. 300K,150K)."
            )
        return tuple(sizes)

    @property
    def student_shape(self) -> dict[str, int] | None:
        values = [getattr(self, name) for name in STUDENT_SHAPE_FIELDS]
        if all(value is None for value in values):
            return None
        hidden, layers, heads, intermediate = values
        return {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": intermediate,
        }

    def result_settings(self, assistant_params: Sequence[int] = ()) -> dict[str, Any]:
        """The fields that decide the exported student (the run's identity), sizes as plain numbers.

        ``assistant_params`` is the planned chain (each assistant's achieved parameter count, largest first:
        ``Plan.assistants``), not the ``assistants`` text: '60K' and '60000' plan one chain, and 'auto' with the
        teacher within reach plans none, which is the identity of a run without assistants.
        """
        dropped = set(NON_RESULT_FIELDS) | set(ASSISTANT_FIELDS)
        if self.loss != "taid":
            dropped.update(TAID_FIELDS)
        if not self.generates:
            dropped.update(ON_POLICY_FIELDS)
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in dropped}
        values["student_params"] = self.student_param_count
        values["train_tokens"] = self.train_token_count
        if assistant_params:
            values["assistants"] = [int(params) for params in assistant_params]
            values["assistant_tokens"] = self.assistant_token_count
        return values


def _count(key: str, value: str | int) -> int:
    from hf_capgap.law import parse_params

    try:
        number = parse_params(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a count; write it like 170000, 60M, 1.5B or 2e9.") from None
    if number < 1 or not math.isfinite(number):
        raise ConfigError(f"{key}={value!r} must be a positive count.")
    return round(number)


# ---------------------------------------------------------------------------------------------- reading
