"""The capacity-gap sweep: prune every teacher into every smaller student size, distill, evaluate.

MiniMA's protocol: for each student size s and each teacher t larger than s, the student is made by
pruning t to s, distilled from t on the same token budget as every other run, and evaluated on
held-out text. For each s the best teacher t*(s) is where that loss is lowest; the law of capacity
gap says t* grows linearly with s. :func:`run_sweep` does this and fits :class:`CapacityGapLaw`.

The output directory holds::

    ledger.jsonl      one JSON record per finished run (rewritten whole, atomically, per record)
    running.json      the run in progress and its process id (absent between runs)
    .sweep.lock       held (flock) by the one sweep working in this folder, released when it ends or dies
    .run-*            the Trainer scratch folder of the run in progress
    caches/<teacher>  one TeacherCache per teacher, shared by all of its students
    law.json law.png  the fitted law, or law_failure.json saying why it could not be fitted

A killed sweep restarts where it stopped: finished runs are read from the ledger and skipped, a
torn last ledger line is dropped, teacher caches resume shard by shard, and the interrupted run is
redone from its start.

One sweep at a time works in an output directory: :func:`run_sweep` takes an exclusive ``flock`` on
``.sweep.lock`` (the kernel releases it when the process dies, even by SIGKILL) and a second sweep on
the same folder is refused. Holding the lock, it removes every ``.run-*`` scratch folder it finds:
only the lock holder creates them, so any found at start belong to a killed sweep.

A run whose student diverged (a non-finite ``eval_loss``) is a finished record like any other;
``redo_failed: true`` drops those records and runs them again (with the same settings, so a
divergence the settings cause comes back: change them in a new ``output_dir`` then).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_capgap.utils.artifacts import (
    ArtifactError,
    atomic_write_bytes,
    atomic_write_json,
    json_sha256,
)
from hf_capgap.law import CapacityGapLaw, format_params, parse_params

LEDGER_FILE = "ledger.jsonl"
RUNNING_FILE = "running.json"
LAW_FILE = "law.json"
LAW_PLOT_FILE = "law.png"
LAW_FAILURE_FILE = "law_failure.json"
LOCK_FILE = ".sweep.lock"
SCRATCH_PREFIX = ".run-"
LEDGER_FORMAT_VERSION = 1
CACHE_MODES = ("topk", "sampled", "online")

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


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep measures; every field is a key of the recipe YAML and a ``--key value`` override."""

    family: str = field(default="tiny", metadata=_help("A ladder preset (tiny, micro) or a Hub family (pythia, gpt2)."))
    student_sizes: list[str] = field(
        default_factory=lambda: ["110K", "170K", "240K"],
        metadata=_help("Student sizes in total parameters (110K, 100M, 1.5B, 2e9); each is pruned from every larger teacher."),
    )
    output_dir: str = field(default="outputs/sweep/tiny", metadata=_help("Folder of the ledger, caches and law."))
    teachers: list[str] = field(default_factory=list, metadata=_help("Teachers of the family to use; empty: all."))
    tokens_per_run: int = field(default=307_200, metadata=_help("Distillation tokens of every run (the shared budget)."))
    seq_len: int = field(default=128, metadata=_help("Tokens per packed row."))
    batch_size: int = field(default=16, metadata=_help("Rows per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    learning_rate: float = field(default=1e-3, metadata=_help("Peak AdamW learning rate (cosine schedule)."))
    warmup_ratio: float = field(default=0.05, metadata=_help("Fraction of steps spent warming up."))
    loss: str = field(default="forward_kl", metadata=_help("Divergence (DistillationConfig.loss)."))
    alpha: float = field(default=0.5, metadata=_help("Weight of the divergence; 1 - alpha weights LM cross-entropy."))
    temperature: float = field(default=1.0, metadata=_help("Softmax temperature of the divergence."))
    cache_mode: str = field(default="topk", metadata=_help("Teacher signal: topk or sampled TeacherCache, or online."))
    cache_k: int = field(default=64, metadata=_help("Logits (or draws) kept per position by the cache."))
    cache_sampler: str = field(default="systematic", metadata=_help("How a sampled cache draws: systematic "
                                                                   "(one uniform per position) or multinomial."))
    eval_rows: int = field(default=256, metadata=_help("Held-out packed rows every model is scored on."))
    calibration_rows: int = field(default=32, metadata=_help("Rows for the Taylor importance scores."))
    bf16: bool = field(default=False, metadata=_help("Train students in bf16 mixed precision (GPUs)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in backward passes "
                                                                       "(students and Taylor scoring)."))
    teacher_dtype: str = field(default="auto", metadata=_help("Teacher dtype: auto (bf16 on a GPU, float32 on a CPU), "
                                                              "bfloat16, float16 or float32."))
    ladder_dir: str | None = field(default=None, metadata=_help("Folder of the ladder teachers (ladder families)."))
    seed: int = field(default=0, metadata=_help("Seed of initialisation and the cache's samples."))
    redo_failed: bool = field(
        default=False,
        metadata=_help("Run again the ledger's runs whose eval_loss is not finite (diverged), replacing their records; "
                       "same settings, so a divergence the settings cause recurs."),
    )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepConfig:
        """Build from YAML-like values (strings allowed, sizes like ``280K``); unknown keys raise."""
        fields = {item.name: item for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown sweep config keys {unknown}; valid keys: {sorted(fields)}.")
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
        from hf_capgap.cache.format import SAMPLERS
        from hf_capgap.losses import DIVERGENCES
        from hf_capgap.models import TEACHER_DTYPE_CHOICES

        object.__setattr__(self, "student_sizes", [str(s) for s in _as_list(self.student_sizes, "student_sizes")])
        object.__setattr__(self, "teachers", [str(t) for t in _as_list(self.teachers, "teachers")])
        if self.family not in family_names():
            raise ValueError(f"family={self.family!r} is unknown; choose one of {family_names()}.")
        if not self.student_sizes:
            raise ValueError("student_sizes is empty; list at least one student parameter count.")
        for size in self.student_sizes:
            try:
                parse_params(size)
            except ValueError:
                raise ValueError(f"student_sizes holds {size!r}, not a size; write sizes like 110K, 100M or 1.5B.") from None
        for name in ("tokens_per_run", "seq_len", "batch_size", "gradient_accumulation_steps", "eval_rows",
                     "calibration_rows", "cache_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive.")
        if self.tokens_per_run < self.tokens_per_step:
            raise ValueError(
                f"tokens_per_run={self.tokens_per_run} is less than one optimizer step (batch_size*"
                f"gradient_accumulation_steps*seq_len={self.tokens_per_step}); raise tokens_per_run."
            )
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode={self.cache_mode!r} must be one of {CACHE_MODES}.")
        if self.cache_mode == "sampled" and self.loss != "forward_kl":
            raise ValueError(f"cache_mode='sampled' estimates forward_kl only; got loss={self.loss!r}.")
        if self.cache_sampler not in SAMPLERS:
            raise ValueError(f"cache_sampler={self.cache_sampler!r} must be one of {SAMPLERS}.")
        if self.loss not in DIVERGENCES:
            raise ValueError(f"loss={self.loss!r} must be one of {', '.join(DIVERGENCES)}.")
        if not 0.0 <= self.alpha <= 1.0 or not self.temperature > 0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1] and temperature={self.temperature} > 0.")
        if self.teacher_dtype not in TEACHER_DTYPE_CHOICES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r} must be one of {TEACHER_DTYPE_CHOICES}.")
        available = family_teachers(self.family)
        unknown = sorted(set(self.teachers) - set(available))
        if unknown:
            raise ValueError(f"teachers {unknown} are not in family {self.family!r}; choose from {sorted(available)}.")
        largest = max(self.teacher_sizes().values())
        too_big = [size for size in self.student_params if size >= largest]
        if too_big:
            raise ValueError(
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
        for per_sweep in ("student_sizes", "teachers", "output_dir", "ladder_dir", "gradient_checkpointing",
                          "redo_failed"):
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
        raise ValueError(f"{name} must be a list, got {value!r}.")
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


# ---------------------------------------------------------------------- ledger


def read_ledger(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The finished records; a torn last line (a write cut short) is dropped with a warning.

    A malformed line anywhere else means the file was edited or damaged: ArtifactError names it.
    """
    path = Path(output_dir) / LEDGER_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_record(line)
        is_last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == "")
        if record is None and is_last and not text.endswith("\n"):
            warnings.warn(f"{path}: dropped a torn last line (an interrupted write).", stacklevel=2)
            continue
        if record is None:
            raise ArtifactError(
                f"{path} line {number} is not a sweep record; remove that line (its run will be redone)."
            )
        records.append(record)
    run_ids = [record["run_id"] for record in records]
    duplicated = sorted({run_id for run_id in run_ids if run_ids.count(run_id) > 1})
    if duplicated:
        raise ArtifactError(f"{path} holds runs {duplicated} more than once; keep one line per run.")
    return records


def append_record(output_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Add one record by rewriting the whole ledger atomically (temp file + rename)."""
    _write_ledger(output_dir, [*read_ledger(output_dir), dict(record)])


def _write_ledger(output_dir: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in records)
    atomic_write_bytes(Path(output_dir) / LEDGER_FILE, text.encode())


def is_failed(record: Mapping[str, Any]) -> bool:
    """A run whose student diverged: its eval_loss is NaN or infinite."""
    loss = record["eval_loss"]
    return not (isinstance(loss, (int, float)) and math.isfinite(loss))


def _parse_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    required = ("run_id", "format_version", "student_params", "teacher_params", "eval_loss", "settings_sha256")
    if not isinstance(record, dict) or any(field not in record for field in required):
        return None
    return record


# ---------------------------------------------------------------------- progress


def sweep_status(config: SweepConfig) -> list[dict[str, Any]]:
    """Each planned run with its state: ``done`` (in the ledger), ``running`` (a live process) or ``left``."""
    done = {record["run_id"]: record for record in read_ledger(config.output_dir)}
    running = _live_running_run(Path(config.output_dir))
    rows = []
    for spec in plan(config):
        record = done.get(spec.run_id)
        state = "done" if record else "running" if spec.run_id == running else "left"
        rows.append({**dataclasses.asdict(spec), "state": state, "eval_loss": record and record["eval_loss"]})
    return rows


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    """A terminal table of :func:`sweep_status` rows and a one-line count."""
    lines = [f"{'run':<28}{'student':>9}{'teacher':>10}  {'state':<8}{'eval loss':>10}"]
    for row in rows:
        loss = "" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        lines.append(
            f"{row['run_id']:<28}{format_params(row['student_params']):>9}"
            f"{format_params(row['teacher_params']):>10}  {row['state']:<8}{loss:>10}"
        )
    counts = {state: sum(row["state"] == state for row in rows) for state in ("done", "running", "left")}
    lines.append(", ".join(f"{count} {state}" for state, count in counts.items()))
    return "\n".join(lines)


def _live_running_run(output_dir: Path) -> str | None:
    try:
        running = json.loads((output_dir / RUNNING_FILE).read_text())
        os.kill(int(running["pid"]), 0)
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError, ProcessLookupError, PermissionError):
        return None
    return running["run_id"]


# ---------------------------------------------------------------------- running


def check_hub_access(model_ids: Sequence[str]) -> None:
    """Fail before any work when a Hub teacher is neither cached locally nor reachable."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    missing = [model_id for model_id in model_ids if not isinstance(try_to_load_from_cache(model_id, "config.json"), str)]
    if not missing:
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"teachers {missing} are not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
            "downloading them; download them on a machine with network access, or unset HF_HUB_OFFLINE."
        )
    api = HfApi(endpoint=constants.ENDPOINT)
    for model_id in missing:
        try:
            api.model_info(model_id, timeout=10)
        except Exception as err:  # any failure here means the sweep could not load this teacher
            raise ValueError(
                f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} for teacher {model_id!r} ({err}); "
                "the sweep needs network access to download its teachers, or a local cache holding them."
            ) from err


def run_sweep(config: SweepConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run every planned run missing from the ledger (with ``redo_failed``, also those that diverged), then
    fit the law; return the ledger records.

    One process runs the grid, run after run (the ledger has one writer); each run is small.
    """
    from hf_capgap.utils.processes import process_state

    processes = process_state().num_processes
    if processes > 1:
        raise ValueError(
            f"the sweep was launched as {processes} processes; it runs its grid in one "
            "process with one ledger writer. Start it with `python recipes/sweep.py CONFIG`."
        )
    output_dir = Path(config.output_dir)
    specs = plan(config)
    if config.family in HUB_FAMILIES:
        check_hub_access(list(dict.fromkeys(spec.teacher for spec in specs)))
    output_dir.mkdir(parents=True, exist_ok=True)
    with _sweep_lock(output_dir):
        _remove_stale_scratch(output_dir)
        settings_sha = json_sha256(config.settings())
        finished = read_ledger(output_dir)
        foreign = [record["run_id"] for record in finished if record["settings_sha256"] != settings_sha]
        if foreign:
            raise ValueError(
                f"{output_dir / LEDGER_FILE} holds runs {foreign} made with other settings; use another output_dir "
                "or the settings those runs used."
            )
        failed = [record["run_id"] for record in finished if is_failed(record)]
        if failed and config.redo_failed:
            finished = [record for record in finished if record["run_id"] not in failed]
            _write_ledger(output_dir, finished)
        elif failed and progress:
            print(f"{len(failed)} run(s) diverged (eval_loss not finite): {', '.join(failed)}; "
                  "run again with --redo_failed true to redo them.")
        done = {record["run_id"] for record in finished}
        pending = [spec for spec in specs if spec.run_id not in done]
        if pending:
            _run_pending(config, pending, settings_sha, progress)
        if progress:
            print(format_status(sweep_status(config)))
        by_id = {record["run_id"]: record for record in read_ledger(output_dir)}
        records = [by_id[spec.run_id] for spec in specs]
        fit_and_save_law(records, output_dir, progress=progress)
    return records


@contextmanager
def _sweep_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir`` for this process: the ledger has one writer and the scratch folders one owner.

    ``flock`` is released by the kernel when the process exits or is killed, so no stale lock survives a
    SIGKILL; a second sweep on the same folder is refused, naming the holder.
    """
    import fcntl

    with open(output_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(
                f"another sweep (process {holder}) is running in output_dir={output_dir}; wait for it to finish "
                "or use another output_dir."
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _remove_stale_scratch(output_dir: Path) -> None:
    """Remove the ``.run-*`` scratch folders a killed sweep left (SIGKILL skips :func:`_scratch_dir`'s
    cleanup). Call only under :func:`_sweep_lock`: its holder alone creates them, so all found are stale."""
    from transformers.utils import logging

    for path in sorted(output_dir.glob(f"{SCRATCH_PREFIX}*")):
        if path.is_dir():
            logging.get_logger(__name__).warning(f"removing {path}, scratch of a sweep run that was killed")
            shutil.rmtree(path)


def fit_and_save_law(
    records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, *, progress: bool = True
) -> CapacityGapLaw | None:
    """Fit the law and write law.json + law.png, or law_failure.json with the reason; never a guess."""
    output_dir = Path(output_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            law = CapacityGapLaw.fit(records)
        except ValueError as err:
            (output_dir / LAW_FILE).unlink(missing_ok=True)
            (output_dir / LAW_PLOT_FILE).unlink(missing_ok=True)
            atomic_write_json(output_dir / LAW_FAILURE_FILE, {"error": str(err), "runs": len(records)})
            if progress:
                print(f"the law could not be fitted: {err}")
            return None
    law.save(output_dir / LAW_FILE)
    law.plot(output_dir / LAW_PLOT_FILE)
    (output_dir / LAW_FAILURE_FILE).unlink(missing_ok=True)
    if progress:
        print(law.summary())
        for warning in caught:
            print(f"note: {warning.message}")
    return law


def _run_pending(config: SweepConfig, pending: list[RunSpec], settings_sha: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    source = _TeacherSource(config, pending[0].teacher)
    data = source.data()
    bar = tqdm(total=len(pending), desc="capacity-gap sweep", unit="run", disable=not progress)
    for teacher_name in dict.fromkeys(spec.teacher for spec in pending):
        teacher, teacher_params = source.load(teacher_name)
        teacher_eval = _evaluate(teacher, data["eval"], config.batch_size)
        cache_path = None
        if config.cache_mode != "online":
            cache_path = output_dir / "caches" / teacher_name.rsplit("/", 1)[-1]
            _build_cache(teacher, data["train"], cache_path, config, source.tokenizer, progress)
        for spec in (spec for spec in pending if spec.teacher == teacher_name):
            bar.set_postfix_str(spec.run_id)
            atomic_write_json(output_dir / RUNNING_FILE, {"run_id": spec.run_id, "pid": os.getpid()})
            record = _run_one(spec, teacher, cache_path, data, source.tokenizer, config)
            append_record(
                output_dir,
                {
                    **record,
                    "family": config.family,
                    "teacher_params": teacher_params,
                    "teacher_eval_loss": teacher_eval,
                    "settings": config.settings(),
                    "settings_sha256": settings_sha,
                    "format_version": LEDGER_FORMAT_VERSION,
                },
            )
            (output_dir / RUNNING_FILE).unlink(missing_ok=True)
            bar.update()
        del teacher
    bar.close()


def _build_cache(teacher: Any, train: Any, path: Path, config: SweepConfig, tokenizer: Any, progress: bool) -> None:
    """One cache per teacher, of the rows exactly as every student's trainer prepares them."""
    from hf_capgap.cache import TeacherCache
    from hf_capgap.trainer import DistillationConfig
    from hf_capgap.trainer.training_arguments import student_training_arguments

    data_args = student_training_arguments(
        DistillationConfig, path, _student_training(config), save_steps=None, logging_steps=1, temperature=config.temperature
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


def _student_training(config: SweepConfig) -> Any:
    """How every student of the sweep trains (and how its rows are prepared)."""
    from hf_capgap.trainer.training_arguments import StudentTraining

    return StudentTraining(
        steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len, learning_rate=config.learning_rate,
        gradient_accumulation_steps=config.gradient_accumulation_steps, warmup_ratio=config.warmup_ratio,
        bf16=config.bf16, gradient_checkpointing=config.gradient_checkpointing, seed=config.seed,
    )


def _run_one(
    spec: RunSpec, teacher: Any, cache_path: Path | None, data: dict[str, Any], tokenizer: Any, config: SweepConfig
) -> dict[str, Any]:
    """Prune the teacher to the student size, distill on the shared token budget, evaluate."""
    import torch

    from hf_capgap.trainer import DistillationConfig
    from hf_capgap.pruning import prune_model
    from hf_capgap.trainer import DistillationTrainer
    from hf_capgap.trainer.training_arguments import student_training_arguments

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    student = prune_model(teacher, target_params=spec.student_params, calibration=data["calibration"],
                          checkpoint_layers=config.gradient_checkpointing)
    student = student.float()  # fp32 master weights under bf16 mixed precision, whatever the teacher's dtype
    pruned_eval = _evaluate(student, data["eval"], config.batch_size)
    steps = config.steps
    with _scratch_dir(Path(config.output_dir)) as work_dir:
        args = student_training_arguments(
            DistillationConfig, work_dir, _student_training(config), save_steps=None, logging_steps=max(1, steps // 4),
            loss=config.loss, alpha=config.alpha, temperature=config.temperature,
            teacher_cache=None if cache_path is None else str(cache_path), disable_tqdm=True,
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=None if cache_path is not None else teacher,
            args=args,
            train_dataset=data["train"],
            processing_class=tokenizer,
        )
        trainer.train()
    final = evaluate_student(student, data["eval"], config.batch_size)
    return {
        "run_id": spec.run_id,
        "student_name": spec.run_id.split("-from-")[0],
        "student_target": spec.student_params,
        "student_params": sum(parameter.numel() for parameter in student.parameters()),
        "teacher": spec.teacher,
        "tokens": steps * config.tokens_per_step,
        "pruned_eval_loss": pruned_eval,
        "eval_loss": final["eval_loss"],
        "perplexity": final["perplexity"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def evaluate_student(model: Any, eval_rows: Any, batch_size: int) -> dict[str, float | int]:
    from hf_capgap.models import evaluate_perplexity

    return evaluate_perplexity(model, eval_rows, batch_size=batch_size)


def _evaluate(model: Any, eval_rows: Any, batch_size: int) -> float:
    return evaluate_student(model, eval_rows, batch_size)["eval_loss"]


@contextmanager
def _scratch_dir(output_dir: Path) -> Iterator[Path]:
    """Trainer output for one run: nothing of it is kept, the ledger record is the result."""
    path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=output_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _TeacherSource:
    """Teachers, tokenizer and data of a family: a pretrained ladder preset or a Hub family."""

    def __init__(self, config: SweepConfig, tokenizer_from: str) -> None:
        self.config = config
        self.tokenizer: Any = None
        self._ladder_paths: dict[str, Path] = {}
        if config.family in HUB_FAMILIES:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        else:
            from hf_capgap.ladder import ensure_ladder, load_teacher

            ladder_dir = config.ladder_dir or str(Path("outputs") / "ladder" / config.family)
            self._ladder_paths = {path.name: path for path in ensure_ladder(config.family, ladder_dir)}
            self.tokenizer = load_teacher(self._ladder_paths[tokenizer_from])[1]

    def load(self, name: str) -> tuple[Any, int]:
        """The teacher model in eval mode and its exact total parameter count."""
        if name in self._ladder_paths:
            from hf_capgap.ladder import load_teacher

            model = load_teacher(self._ladder_paths[name], teacher_dtype=self.config.teacher_dtype)[0]
        else:
            from hf_capgap.models import load_frozen_teacher

            model = load_frozen_teacher(name, teacher_dtype=self.config.teacher_dtype)
        if model.config.max_position_embeddings < self.config.seq_len:
            raise ValueError(
                f"seq_len={self.config.seq_len} exceeds teacher {name}'s max_position_embeddings="
                f"{model.config.max_position_embeddings}; lower seq_len."
            )
        return model.eval(), sum(parameter.numel() for parameter in model.parameters())

    def data(self) -> dict[str, Any]:
        """The shared token budget (first rows of train), held-out rows and calibration batches."""
        import torch

        from hf_capgap.data import load_corpus, tokenize_and_pack

        config = self.config
        packed = tokenize_and_pack(load_corpus(), self.tokenizer, config.seq_len)
        train_rows = config.steps * config.batch_size * config.gradient_accumulation_steps
        for split, needed in (("train", train_rows), ("validation", config.eval_rows)):
            if len(packed[split]) < needed:
                raise ValueError(
                    f"the corpus {split} split packs into {len(packed[split])} rows of {config.seq_len} tokens, "
                    f"fewer than the {needed} the sweep needs; lower tokens_per_run / eval_rows or seq_len."
                )
        train = packed["train"].select(range(train_rows))
        calibration_ids = torch.tensor(train[: config.calibration_rows]["input_ids"], dtype=torch.long)
        return {
            "train": train,
            "eval": packed["validation"].select(range(config.eval_rows)),
            "calibration": [{"input_ids": batch} for batch in calibration_ids.split(config.batch_size)],
        }
