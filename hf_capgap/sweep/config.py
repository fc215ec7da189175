"""What a sweep measures: :class:`SweepConfig`, the teacher families it draws from, and :func:`plan`, the
grid of (student size, teacher) runs."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.law import CapacityGapLaw, format_params, parse_params
from hf_capgap.trainer.settings import OnPolicySettings, TaidSettings, TeacherCacheSettings
from hf_capgap.utils.artifacts import json_sha256
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


TAID_FIELDS = tuple(item.name for item in dataclasses.fields(TaidSettings))
"""The taid_* schedule settings: part of a ledger's settings only when ``loss='taid'`` (so the settings hash of a
ledger made before TAID existed is unchanged)."""
TAID_DEFAULTS = {item.name: item.default for item in dataclasses.fields(TaidSettings)}
"""The default TAID schedule: a TAID cell's run id names a hash of its schedule when it differs from this."""

ON_POLICY_TRAINER_FIELDS = tuple(item.name for item in dataclasses.fields(OnPolicySettings))
"""The on-policy settings every cell passes on to its DistillationConfig."""
ON_POLICY_FIELDS = (*ON_POLICY_TRAINER_FIELDS, "prompt_tokens")
"""The on-policy settings: part of a ledger's settings only when the sweep generates (``lmbda > 0`` or ``seq_kd``),
so an off-policy ledger keeps the settings hash it had before they existed."""

PER_SWEEP_FIELDS = (
    "student_sizes",
    "teachers",
    "output_dir",
    "ladder_dir",
    "gradient_checkpointing",
    "redo_failed",
    "assistants",
    "assistant_tokens",
)
"""Fields left out of :meth:`SweepConfig.settings`: they choose which cells run, or change memory, not what a
cell measures (a chained cell names its assistants and their tokens in its run id and record)."""


@dataclass
class SweepConfig(TeacherCacheSettings, TaidSettings, OnPolicySettings):
    """What a sweep measures; every field is a key of the recipe YAML and a ``--key value`` override.

    The distillation settings (loss, alpha, temperature, teacher_dtype, cache_k, cache_sampler) are
    inherited from :class:`TeacherCacheSettings`, shared with DistillationConfig and MinimaConfig, and
    TAID's schedule (taid_*, used with ``loss: taid``) from :class:`TaidSettings`, and GKD's on-policy settings
    (lmbda, seq_kd, max_completion_length, sampling_*, top_k, top_p; online teacher only) from
    :class:`OnPolicySettings`. On-policy, each training row is its first ``prompt_tokens`` tokens (prompt-only at
    lmbda = 1, else with the row's next ``max_completion_length`` tokens as its completion), and a row counts
    ``prompt_tokens + max_completion_length`` tokens of the budget (:attr:`row_tokens`).

    A ledger holds one set of :meth:`settings`: chained cells share their direct cells' ledger, but a ``loss: taid``
    sweep differs in loss and cache_mode and needs its own output_dir (its run ids end in ``-taid``); the bench
    measures direct, chained and TAID cells side by side through :func:`~hf_capgap.sweep.run_cell`.
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
    prompt_tokens: int = field(
        default=32,
        metadata=field_help(
            "On-policy (lmbda > 0 or seq_kd): tokens of each training row kept as its prompt; the student (or "
            "teacher) generates up to max_completion_length after it (prompt_tokens + max_completion_length <= "
            "seq_len)."
        ),
    )
    assistants: list[str] = field(
        default_factory=list,
        metadata=field_help(
            "Teacher assistants (issue 21): none (default), auto (the paper prior's chain, k = 2.5, for every "
            "cell whose teacher is past reach) or sizes (those between a cell's student and teacher). Each "
            "chained cell runs beside its direct cell on the same ledger."
        ),
    )
    assistant_tokens: int | None = field(
        default=None, metadata=field_help("Distillation tokens of every assistant; default: tokens_per_run.")
    )
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
            elif kind == int | None:
                parsed[name] = int(value)
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
        self.assistants = [str(size) for size in _as_list(self.assistants, "assistants")]
        if self.assistants in (["none"], ["None"]):
            self.assistants = []
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
            "prompt_tokens",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be positive.")
        self._check_on_policy()
        if self.tokens_per_run < self.tokens_per_step:
            row = "(prompt_tokens+max_completion_length)" if self.generates else "seq_len"
            raise ConfigError(
                f"tokens_per_run={self.tokens_per_run} is less than one optimizer step (batch_size*"
                f"gradient_accumulation_steps*{row}={self.tokens_per_step}); raise tokens_per_run."
            )
        self._check_loss()
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
        self._check_assistants()

    def _check_loss(self) -> None:
        """The divergences and TAID; TAID reads the teacher's whole distribution, so only an online teacher
        serves it here (the sweep builds no dense caches)."""
        from hf_capgap.losses import DIVERGENCES

        self.check_distillation_settings((*DIVERGENCES, "taid"))
        if self.loss == "taid" and self.cache_mode != "online":
            raise ConfigError(
                f"loss='taid' needs the teacher's logits over the whole vocabulary, which cache_mode="
                f"{self.cache_mode!r} does not keep; the sweep serves TAID from cache_mode='online' only."
            )
        self.check_teacher_signal(self.cache_mode, TEACHER_SIGNALS)
        self.check_taid_settings()

    def _check_on_policy(self) -> None:
        """Sampling settings in range; generated completions need the online teacher (a cache holds the teacher's
        view of the corpus' tokens only) and rows of prompt + completion within seq_len."""
        self.check_on_policy_settings()
        if not self.generates:
            return
        what = f"lmbda={self.lmbda}" if self.lmbda > 0 else "seq_kd=true"
        if self.cache_mode != "online":
            raise ConfigError(
                f"{what} generates completions, which cache_mode={self.cache_mode!r} cannot score (a teacher cache "
                "holds the teacher's view of the corpus' tokens only); set cache_mode: online, or lmbda: 0 and "
                "seq_kd: false."
            )
        if self.row_tokens > self.seq_len:
            raise ConfigError(
                f"prompt_tokens={self.prompt_tokens} + max_completion_length={self.max_completion_length} exceeds "
                f"seq_len={self.seq_len} (prompts are cut from the corpus' rows of seq_len tokens); lower "
                "prompt_tokens or max_completion_length."
            )

    def _check_assistants(self) -> None:
        if self.assistant_tokens is not None and self.assistant_tokens < self.tokens_per_step:
            raise ConfigError(
                f"assistant_tokens={self.assistant_tokens} is less than one optimizer step ({self.tokens_per_step} "
                "tokens); raise it, or leave it unset for tokens_per_run."
            )
        if self.assistants == ["auto"]:
            return
        if "auto" in self.assistants or "none" in self.assistants:
            raise ConfigError(f"assistants={self.assistants} mixes auto/none with sizes; write auto, none or sizes.")
        sizes = []
        for size in self.assistants:
            try:
                sizes.append(parse_params(size))
            except ValueError:
                raise ConfigError(f"assistants holds {size!r}; write auto, none or sizes like 418K, 1.5B.") from None
        teachers = self.teacher_sizes().values()
        pairs = [(student, teacher) for student in self.student_params for teacher in teachers]
        useless = [
            name for name, size in zip(self.assistants, sizes, strict=True) if not any(s < size < t for s, t in pairs)
        ]
        if useless:
            raise ConfigError(
                f"assistants {useless} lie between no student and larger teacher of this sweep; an assistant must be "
                "smaller than a teacher and larger than a student."
            )

    def assistant_sizes(self, student_params: int, teacher_params: int) -> tuple[int, ...]:
        """The assistants between a teacher and a student, largest first (empty: the cell is direct only).

        ``auto``: the paper prior's chain (k = 2.5, :meth:`CapacityGapLaw.chain`); sizes: those strictly
        between the two."""
        if self.assistants == ["auto"]:
            plan = CapacityGapLaw.paper().chain(student_params, teacher_params)
            return tuple(int(round(size)) for size in plan.assistants)
        sizes = (int(parse_params(size)) for size in self.assistants)
        return tuple(sorted({size for size in sizes if student_params < size < teacher_params}, reverse=True))

    @property
    def assistant_token_budget(self) -> int:
        """Distillation tokens of every assistant (``assistant_tokens``, else ``tokens_per_run``)."""
        return self.tokens_per_run if self.assistant_tokens is None else self.assistant_tokens

    @property
    def row_tokens(self) -> int:
        """Tokens one training row counts: seq_len off-policy; on-policy the student's tokens of the row, its
        prompt and the most it generates (completions stopping at EOS count as if full: the budget is an upper
        bound, and the record's ``completion_length`` says what was generated)."""
        return self.prompt_tokens + self.max_completion_length if self.generates else self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.row_tokens

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
        for per_sweep in PER_SWEEP_FIELDS:
            values.pop(per_sweep)
        if self.loss != "taid":
            for name in TAID_FIELDS:
                values.pop(name)
        if not self.generates:
            for name in ON_POLICY_FIELDS:
                values.pop(name)
        return values


@dataclass(frozen=True)
class RunSpec:
    """One (student size, teacher) cell of the sweep grid; a chained cell distils the student from the last
    of its ``assistants`` (sizes, largest first), each pruned from and distilled from the model above it."""

    run_id: str
    student_params: int
    teacher: str
    teacher_params: int
    assistants: tuple[int, ...] = ()


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
    """Every (student, teacher) pair with teacher > student, grouped by teacher, smallest first; with
    ``assistants``, each pair whose chain has assistants also as a chained cell, after the teacher's direct ones."""
    specs = []
    for teacher, params in sorted(config.teacher_sizes().items(), key=lambda item: item[1]):
        students = [student for student in sorted(config.student_params) if params > student]
        specs += [RunSpec(_run_id(config, student, teacher, ()), student, teacher, params) for student in students]
        for student in students:
            chain = config.assistant_sizes(student, params) if config.assistants else ()
            if chain:
                specs.append(RunSpec(_run_id(config, student, teacher, chain), student, teacher, params, chain))
    return specs


def _run_id(config: SweepConfig, student: int, teacher: str, assistants: tuple[int, ...]) -> str:
    """``110K-from-llama-963K``; a chained cell adds ``-via-`` its assistants (and their tokens when they are
    not tokens_per_run), so its record and its direct cell's live on one ledger (an explicit size that ``60K`` would
    round, like 60040, is written exactly: two such sizes are two cells); a TAID cell adds ``-taid`` (and a
    hash of its schedule when it is not the default), so its record is never taken for a direct cell's."""
    run_id = f"{format_params(student)}-from-{teacher.rsplit('/', 1)[-1]}"
    if assistants:
        run_id += "-via-" + "-".join(_size_label(config, size) for size in assistants)
        if config.assistant_token_budget != config.tokens_per_run:
            run_id += f"-{config.assistant_token_budget}tok"
    if config.loss == "taid":
        run_id += taid_run_suffix({name: getattr(config, name) for name in TAID_FIELDS})
    return run_id


def taid_run_suffix(schedule: Mapping[str, Any]) -> str:
    """What a TAID cell's run id ends with: ``-taid``, plus a hash of its taid_* schedule when not the default."""
    schedule = {name: schedule[name] for name in TAID_FIELDS}
    return "-taid" if schedule == TAID_DEFAULTS else f"-taid-{json_sha256(schedule)[:6]}"


def _size_label(config: SweepConfig, size: int) -> str:
    """An assistant's size in a run id: readable, and exact for an explicit size the readable form rounds (``auto``
    sizes follow from the pair, so their readable form names them)."""
    label = format_params(size)
    return label if config.assistants == ["auto"] or parse_params(label) == size else str(size)
