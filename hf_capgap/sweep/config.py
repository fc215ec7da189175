"""What a sweep measures: :class:`SweepConfig`, the teacher families it draws from, and :func:`plan`, the
grid of (student size, teacher) runs."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.law import format_params, parse_params
from hf_capgap.trainer.settings import TeacherCacheSettings
from hf_capgap.utils.recipe_args import field_help

TEACHER_SIGNALS = ("topk", "sampled", "online")
"""How a sweep's students read their teacher: a topk or sampled TeacherCache, or the teacher run online."""

HUB_FAMILIES: dict[str, dict[str, int]] = {
    "pythia": {
        "EleutherAI/pythia-70m": 70_426_624,
        "EleutherAI/pythia-160m": 162_322_944,
        "EleutherAI/pythia-410m": 405_334_016,
        "EleutherAI/pythia-1b": 1_011_781_632,
        "EleutherAI/pythia-1.4b": 1_414_647_808,
        "EleutherAI/pythia-2.8b": 2_775_208_960,
    },
    "gpt2": {
        "gpt2": 124_439_808,
        "gpt2-medium": 354_823_168,
        "gpt2-large": 774_030_080,
        "gpt2-xl": 1_557_611_200,
    },
}
"""Hub model families by total parameter count (tied embeddings counted once)."""

HUB_MODEL_TYPES = {"pythia": "gpt_neox", "gpt2": "gpt2"}


@dataclass
class SweepConfig(TeacherCacheSettings):
    """What a sweep measures; every field is a key of the recipe YAML and a ``--key value`` override.

    The distillation settings (loss, alpha, temperature, teacher_dtype, cache_k, cache_sampler) are
    inherited from :class:`TeacherCacheSettings`, shared with DistillationConfig and MinimaConfig.
    """

    family: str = field(
        default="tiny", metadata=field_help("A ladder preset (tiny, micro) or a Hub family (pythia, gpt2).")
    )
    student_sizes: list[str] = field(
        default_factory=lambda: ["110K", "170K", "240K"],
        metadata=field_help(
            "Student sizes in total parameters (110K, 100M, 1.5B, 2e9); each is pruned from every larger teacher."
        ),
    )
    output_dir: str = field(default="outputs/sweep/tiny", metadata=field_help("Folder of the ledger, caches and law."))
    teachers: list[str] = field(
        default_factory=list, metadata=field_help("Teachers of the family to use; empty: all.")
    )
    tokens_per_run: int = field(
        default=307_200, metadata=field_help("Distillation tokens of every run (the shared budget).")
    )
    seq_len: int = field(default=128, metadata=field_help("Tokens per packed row."))
    batch_size: int = field(default=16, metadata=field_help("Rows per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=field_help("Micro-batches per optimizer step."))
    learning_rate: float = field(default=1e-3, metadata=field_help("Peak AdamW learning rate (cosine schedule)."))
    warmup_ratio: float = field(default=0.05, metadata=field_help("Fraction of steps spent warming up."))
    cache_mode: str = field(
        default="topk", metadata=field_help("Teacher signal: topk or sampled TeacherCache, or online.")
    )
    eval_rows: int = field(default=256, metadata=field_help("Held-out packed rows every model is scored on."))
    calibration_rows: int = field(default=32, metadata=field_help("Rows for the Taylor importance scores."))
    bf16: bool = field(default=False, metadata=field_help("Train students in bf16 mixed precision (GPUs)."))
    gradient_checkpointing: bool = field(
        default=False, metadata=field_help("Recompute activations in backward passes (students and Taylor scoring).")
    )
    ladder_dir: str | None = field(
        default=None, metadata=field_help("Folder of the ladder teachers (ladder families).")
    )
    seed: int = field(default=0, metadata=field_help("Seed of initialisation and the cache's samples."))
    redo_failed: bool = field(
        default=False,
        metadata=field_help(
            "Run again the ledger's runs whose eval_loss is not finite (diverged), replacing their records; "
            "same settings, so a divergence the settings cause recurs."
        ),
    )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepConfig:
        """Build from YAML-like values (strings allowed, sizes like ``280K``); unknown keys raise."""
        fields = {item.name: item for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown sweep config keys {unknown}; valid keys: {sorted(fields)}.")
        hints = typing.get_type_hints(cls)  # not field.type: HfArgumentParser rewrites it in place
        parsed = {}
        for name, value in values.items():
            kind = hints[name]
            if kind == list[str]:
                parsed[name] = [str(item) for item in _as_list(value, name)]
            elif value is None or kind in (str, str | None):
                parsed[name] = value
            elif kind is bool:
                parsed[name] = value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
            else:
                parsed[name] = kind(value)
        return cls(**parsed)

    @property
    def student_params(self) -> tuple[int, ...]:
        """The student sizes as parameter counts."""
        return tuple(int(parse_params(size)) for size in self.student_sizes)

    def __post_init__(self) -> None:
        self.student_sizes = [str(size) for size in _as_list(self.student_sizes, "student_sizes")]
        self.teachers = [str(teacher) for teacher in _as_list(self.teachers, "teachers")]
        if self.family not in family_names():
            raise ConfigError(f"family={self.family!r} is unknown; choose one of {family_names()}.")
        if not self.student_sizes:
            raise ConfigError("student_sizes is empty; list at least one student parameter count.")
        for size in self.student_sizes:
            try:
                parse_params(size)
            except ValueError:
                raise ConfigError(
                    f"student_sizes holds {size!r}, not a size; write sizes like 110K, 100M or 1.5B."
                ) from None
        for name in (
            "tokens_per_run",
            "seq_len",
            "batch_size",
            "gradient_accumulation_steps",
            "eval_rows",
            "calibration_rows",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be positive.")
        if self.tokens_per_run < self.tokens_per_step:
            raise ConfigError(
                f"tokens_per_run={self.tokens_per_run} is less than one optimizer step (batch_size*"
                f"gradient_accumulation_steps*seq_len={self.tokens_per_step}); raise tokens_per_run."
            )
        self.check_distillation_settings()
        self.check_teacher_signal(self.cache_mode, TEACHER_SIGNALS)
        available = family_teachers(self.family)
        unknown = sorted(set(self.teachers) - set(available))
        if unknown:
            raise ConfigError(
                f"teachers {unknown} are not in family {self.family!r}; choose from {sorted(available)}."
            )
        largest = max(self.teacher_sizes().values())
        too_big = [size for size in self.student_params if size >= largest]
        if too_big:
            raise ConfigError(
                f"student_sizes {too_big} are not smaller than any teacher (largest: {format_params(largest)}); "
                "every student is pruned from a larger teacher."
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.seq_len

    @property
    def steps(self) -> int:
        """Optimizer steps of every run (one process)."""
        return self.tokens_per_run // self.tokens_per_step

    def teacher_sizes(self) -> dict[str, int]:
        """The chosen teachers (all of the family when ``teachers`` is empty) and their sizes."""
        available = family_teachers(self.family)
        return {name: available[name] for name in (self.teachers or available)}

    def settings(self) -> dict[str, Any]:
        """The fields every run of one ledger must share; a ledger with other settings is refused.

        Activation checkpointing changes memory, not results, so it may differ between sessions.
        """
        values = dataclasses.asdict(self)
        for per_sweep in (
            "student_sizes",
            "teachers",
            "output_dir",
            "ladder_dir",
            "gradient_checkpointing",
            "redo_failed",
        ):
            values.pop(per_sweep)
        return values


@dataclass(frozen=True)
class RunSpec:
    """One (student size, teacher) cell of the sweep grid."""

    run_id: str
    student_params: int
    teacher: str
    teacher_params: int


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list, got {value!r}.")
    return list(value)


def family_names() -> list[str]:
    from hf_capgap.ladder import LADDERS

    return sorted({*LADDERS, *HUB_FAMILIES})


def family_teachers(family: str) -> dict[str, int]:
    """Teacher name -> total parameter count, smallest first, for a ladder preset or Hub family."""
    if family in HUB_FAMILIES:
        return dict(HUB_FAMILIES[family])
    from hf_capgap.ladder import preset_rungs

    return {rung.name: rung.params for rung in preset_rungs(family)}


def plan(config: SweepConfig) -> list[RunSpec]:
    """Every (student, teacher) pair with teacher > student, grouped by teacher, smallest first."""
    return [
        RunSpec(f"{format_params(student)}-from-{teacher.rsplit('/', 1)[-1]}", student, teacher, params)
        for teacher, params in sorted(config.teacher_sizes().items(), key=lambda item: item[1])
        for student in sorted(config.student_params)
        if params > student
    ]
