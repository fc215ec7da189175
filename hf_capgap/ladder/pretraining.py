"""Pretrain ladder teachers from scratch with ``transformers.Trainer`` (plain next-token loss).

Runs are resumable: Trainer checkpoints live in ``<output_dir>/.work/``, a rerun after a kill
continues from the last one, and a finished teacher (``<output_dir>/<rung name>/`` with a "teacher"
manifest) is reused instead of retrained. A teacher directory appears only once complete.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import _re_checkpoint
from transformers.utils import logging

from hf_capgap.data import default_tokenizer, load_corpus, make_collator, tokenize_and_pack
from hf_capgap.ladder.ladder import (
    LADDERS,
    LadderRung,
    build_ladder,
    count_parameters,
    rung_name,
)
from hf_capgap.utils.artifacts import (
    ArtifactError,
    atomic_directory,
    dataset_fingerprint,
    json_sha256,
    read_manifest,
    tokenizer_fingerprint,
    write_manifest,
)
from hf_capgap.utils.processes import process_state
from hf_capgap.utils.recipe_args import field_help
from hf_capgap.utils.training_arguments import StudentTraining, student_training_arguments

logger = logging.get_logger(__name__)

TEACHER_KIND = "teacher"
TEACHER_FORMAT_VERSION = 1
WORK_DIR_NAME = ".work"


class Checkpoint(NamedTuple):
    """A Trainer checkpoint folder and the step it holds (read from its name)."""

    path: str
    step: int


def last_complete_checkpoint(folder: str | os.PathLike) -> Checkpoint | None:
    """The newest ``checkpoint-N`` in ``folder`` that the Trainer finished writing, or None (start afresh).

    Only folders named exactly ``checkpoint-<step>`` count, as in transformers' ``get_last_checkpoint``: a
    copy such as ``checkpoint-3.bak`` or ``checkpoint-9-old`` is neither resumed from nor outranks the real
    ones. The Trainer writes a checkpoint's files one by one and ``trainer_state.json`` last, so a kill during
    a save leaves a newer folder without it, from which every resume would fail; such folders are skipped,
    with a warning naming them.
    """
    folder = Path(folder)
    found: list[Checkpoint] = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _re_checkpoint.search(path.name)  # ^checkpoint-(\d+)$, as get_last_checkpoint reads
        if match is not None and path.is_dir():
            found.append(Checkpoint(str(path), int(match.group(1))))
    for checkpoint in sorted(found, key=lambda candidate: (candidate.step, candidate.path), reverse=True):
        if Path(checkpoint.path, TRAINER_STATE_NAME).is_file():
            return checkpoint
        logger.warning(
            f"skipping {checkpoint.path}: it has no {TRAINER_STATE_NAME} (its write was cut off); "
            "resuming from the newest complete checkpoint before it."
        )
    return None


class _AlreadyTrained(Exception):
    """Raised by :class:`_StopWhenAlreadyTrained` to leave ``Trainer.train`` before its first step."""


class _StopWhenAlreadyTrained(TrainerCallback):
    """Stops ``train()`` before any step when the checkpoint it resumed from already holds ``max_steps`` steps.

    The Trainer resumes such a checkpoint into a new epoch and runs one step more before its step-end check
    stops it, whenever an epoch is not ``max_steps`` steps (an IterableDataset, whose epochs the Trainer sets
    to ``max_steps`` steps and ``sys.maxsize`` of them, or a dataset longer or shorter than the run).
    ``on_train_begin`` comes after the checkpoint's weights, optimizer and state were loaded by whichever
    backend runs (DDP, FSDP, DeepSpeed), so stopping there leaves the trainer as the finished run left it.
    """

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            raise _AlreadyTrained


def _end_untrained_run(trainer: Trainer) -> None:
    """Close what ``train()`` opened before :class:`_StopWhenAlreadyTrained` left it, as its own end does.

    The callbacks get ``on_train_end`` (the progress bar closes), the memory tracker leaves its "train"
    stage (else later ``evaluate()`` calls report no memory metrics) and the trainer is no longer in train.
    ``control.should_training_stop`` cannot do this instead: the Trainer runs a step of the epoch before
    reading it.
    """
    trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    if not trainer._memory_tracker.skip_memory_metrics:
        trainer._memory_tracker.stop("train")
    trainer.is_in_train = False


def train_from(trainer: Trainer, checkpoint: Checkpoint | None) -> None:
    """``trainer.train()`` resumed from ``checkpoint`` (None: from the start), training nothing when the
    checkpoint is the run's last (a run killed after its final save, before it published its model)."""
    stop = _StopWhenAlreadyTrained()
    trainer.add_callback(stop)
    try:
        trainer.train(resume_from_checkpoint=None if checkpoint is None else checkpoint.path)
    except _AlreadyTrained:
        _end_untrained_run(trainer)
        logger.warning(
            f"{checkpoint.path} holds all {trainer.state.max_steps} steps: finishing from it without training."
        )
    finally:
        trainer.remove_callback(stop)


@dataclass(frozen=True)
class PretrainSettings:
    """Data and optimisation settings shared by every rung of a ladder."""

    vocab_size: int = field(
        default=8192, metadata=field_help("Size of the BPE vocabulary trained on the embedded corpus.")
    )
    seq_len: int = field(default=128, metadata=field_help("Tokens per packed training row (the teachers' context)."))
    max_tokens: int = field(
        default=1_000_000, metadata=field_help("Training tokens of every rung, all processes together.")
    )
    batch_size: int = field(default=16, metadata=field_help("Rows per device per step."))
    learning_rate: float = field(default=3e-3, metadata=field_help("Peak AdamW learning rate (cosine schedule)."))
    warmup_ratio: float = field(default=0.05, metadata=field_help("Fraction of steps spent warming up."))
    weight_decay: float = field(default=0.1, metadata=field_help("AdamW weight decay."))
    eval_rows: int = field(default=256, metadata=field_help("Validation rows for the final held-out loss."))
    save_steps: int = field(default=100, metadata=field_help("Checkpoint interval (what a killed run resumes from)."))
    logging_steps: int = field(default=25, metadata=field_help("Logging interval."))
    seed: int = field(default=0, metadata=field_help("Seed of initialisation and data order."))


@dataclass(frozen=True)
class LadderRun:
    """Which ladder to pretrain and where (the keys of a pretrain preset besides PretrainSettings)."""

    preset: str = field(
        default="tiny", metadata=field_help("Ladder preset: a key of hf_capgap.ladder.LADDERS (tiny, micro).")
    )
    output_dir: str = field(default="outputs/ladder/tiny", metadata=field_help("Folder the teachers are written to."))
    cache_dir: str | None = field(
        default=None, metadata=field_help("Cache of the tokenized corpus; null: the default.")
    )
    num_proc: int | None = field(default=None, metadata=field_help("Processes for tokenization; null: one."))


PRETRAIN_PRESETS: dict[str, PretrainSettings] = {
    "micro": PretrainSettings(
        vocab_size=512,
        seq_len=64,
        max_tokens=24_576,
        batch_size=16,
        learning_rate=1e-2,
        eval_rows=64,
        save_steps=8,
        logging_steps=4,
    ),
    "tiny": PretrainSettings(
        vocab_size=2048,
        seq_len=128,
        max_tokens=2_000_000,
        batch_size=16,
        learning_rate=3e-3,
        eval_rows=512,
        save_steps=200,
        logging_steps=100,
    ),
}


def preset_rungs(preset: str, vocab_size: int | None = None, seq_len: int | None = None) -> list[LadderRung]:
    """The rungs of ``LADDERS[preset]``; vocabulary and context default to the preset's settings."""
    if preset not in LADDERS:
        raise ValueError(f"preset={preset!r} is unknown; choose one of {sorted(LADDERS)}.")
    ladder, settings = LADDERS[preset], PRETRAIN_PRESETS[preset]
    return build_ladder(
        ladder.sizes,
        vocab_size or settings.vocab_size,
        head_dim=ladder.head_dim,
        max_position_embeddings=seq_len or settings.seq_len,
    )


def pretrain(
    rung_or_config: LadderRung | LlamaConfig,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    output_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    seq_len: int,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.1,
    save_steps: int = 100,
    logging_steps: int = 25,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Train a LLaMA model from scratch on packed rows and save it to ``output_dir/<rung name>/``.

    ``train_dataset`` / ``eval_dataset`` are packed (``input_ids`` rows of ``seq_len``, as made by
    :func:`hf_capgap.data.tokenize_and_pack`). Returns the teacher directory; if a finished teacher
    made from the same inputs is already there it is returned untouched (a foreign one raises
    ArtifactError), and an interrupted run resumes from its last checkpoint. Run one training job
    per ``output_dir`` at a time: two jobs on the same rung would share its checkpoint folder.
    """
    config = _teacher_config(rung_or_config, tokenizer)
    params, non_embedding = count_parameters(config)
    name = rung_or_config.name if isinstance(rung_or_config, LadderRung) else rung_name(params)
    _check_inputs(config, tokenizer, train_dataset, eval_dataset, seq_len, max_tokens, batch_size, learning_rate)
    # max_tokens is the whole run's budget: under N launched processes each step sees N batches.
    steps = max(1, max_tokens // (batch_size * seq_len * process_state().num_processes))
    settings = {
        "max_tokens": max_tokens,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay,
    }
    expected = _expected_manifest(config, train_dataset, eval_dataset, tokenizer, settings)
    teacher_dir = Path(output_dir) / name
    work_dir = Path(output_dir) / WORK_DIR_NAME / f"{name}-{json_sha256(expected)[:12]}"
    if teacher_dir.exists():
        _check_finished_teacher(teacher_dir, expected)
        return teacher_dir
    training = StudentTraining(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        learning_rate=learning_rate,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        seed=seed,
    )
    args = student_training_arguments(
        TrainingArguments,
        work_dir,
        training,
        save_steps=save_steps,
        logging_steps=logging_steps,
        per_device_eval_batch_size=batch_size,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    checkpoint, wall_seconds, eval_loss = _train_and_evaluate(trainer, work_dir)
    if trainer.is_world_process_zero():  # one writer, whatever the launch
        _publish_teacher(
            teacher_dir,
            model,
            tokenizer,
            {
                **expected,
                "config": _config_dict(config),
                "name": name,
                "params": params,
                "non_embedding_params": non_embedding,
                "tokens_seen": trainer.state.global_step * batch_size * seq_len * args.world_size,
                "final_validation_loss": eval_loss,
                "resumed_from_step": None if checkpoint is None else checkpoint.step,
                "wall_seconds": round(wall_seconds, 1),
            },
        )
        shutil.rmtree(work_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return teacher_dir


def _teacher_config(rung_or_config: LadderRung | LlamaConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """A copy of the rung's config carrying the tokenizer's special tokens (the caller's config stays as it is)."""
    config = copy.deepcopy(rung_or_config.config if isinstance(rung_or_config, LadderRung) else rung_or_config)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _expected_manifest(
    config: LlamaConfig,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """What a finished teacher made from these inputs records: a rerun reuses it only when they match, and
    their hash names the checkpoint folder, so a run with other inputs never resumes another's checkpoint."""
    return {
        "config_sha256": json_sha256(_config_dict(config)),
        "data_fingerprint": dataset_fingerprint(train_dataset),
        "eval_data_fingerprint": dataset_fingerprint(eval_dataset),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "settings": settings,
    }


def _train_and_evaluate(trainer: Trainer, work_dir: Path) -> tuple[Checkpoint | None, float, float]:
    """Train from the last complete checkpoint in ``work_dir`` (if any); returns that checkpoint, the
    training's wall seconds and the held-out loss."""
    checkpoint = last_complete_checkpoint(work_dir)
    started = time.perf_counter()
    train_from(trainer, checkpoint)
    wall_seconds = time.perf_counter() - started
    return checkpoint, wall_seconds, trainer.evaluate()["eval_loss"]


def _check_finished_teacher(teacher_dir: Path, expected: dict[str, Any]) -> None:
    """Raise unless the teacher already in ``teacher_dir`` was made from the same inputs (then it is reused)."""
    try:
        read_manifest(teacher_dir, TEACHER_KIND, TEACHER_FORMAT_VERSION, expected=expected)
    except ArtifactError as error:
        raise ArtifactError(
            f"{error} Delete {teacher_dir} to pretrain it again, or choose another folder (ladder_dir)."
        ) from error


def _publish_teacher(
    teacher_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, manifest: dict[str, Any]
) -> None:
    """Write the trained model, its tokenizer and ``manifest`` to ``teacher_dir`` at once (it appears complete)."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with atomic_directory(teacher_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, TEACHER_KIND, TEACHER_FORMAT_VERSION, manifest)


class LadderTeacher(NamedTuple):
    """A loaded ladder rung; unpacks as ``model, tokenizer, manifest``."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    manifest: dict[str, Any]


def load_teacher(path: str | os.PathLike, *, teacher_dtype: str = "auto") -> LadderTeacher:
    """A pretrained ladder teacher (frozen, on this process's device, through the one loader
    :func:`hf_capgap.models.load_frozen_teacher`), its tokenizer and manifest, after checking the
    manifest, the file checksums and the tokenizer's fingerprint."""
    from hf_capgap.models import load_frozen_teacher

    manifest = read_manifest(path, TEACHER_KIND, TEACHER_FORMAT_VERSION, verify_files=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    read_manifest(
        path,
        TEACHER_KIND,
        TEACHER_FORMAT_VERSION,
        expected={"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
    )
    return LadderTeacher(load_frozen_teacher(path, teacher_dtype=teacher_dtype), tokenizer, manifest)


def ensure_ladder(
    preset: str,
    root_dir: str | os.PathLike,
    *,
    settings: PretrainSettings | None = None,
    corpus: datasets.DatasetDict | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    only: Collection[str] | None = None,
) -> list[Path]:
    """Pretrain every rung of ``LADDERS[preset]`` (or the rungs named in ``only``) that ``root_dir``
    does not already hold; returns their folders in ladder order.

    Data: ``corpus`` (``train`` / ``validation`` text splits; default: the embedded corpus) packed
    with ``tokenizer`` (default: :func:`default_tokenizer` of ``settings.vocab_size``), evaluated on
    the first ``settings.eval_rows`` packed validation rows (the same held-out text for every rung).
    """
    if preset not in LADDERS:
        raise ValueError(f"preset={preset!r} is unknown; choose one of {sorted(LADDERS)}.")
    settings = settings or PRETRAIN_PRESETS[preset]
    if settings.eval_rows < 1:
        raise ValueError(f"eval_rows={settings.eval_rows} must be >= 1 to measure the validation loss.")
    if corpus is not None and not {"train", "validation"} <= set(corpus):
        raise ValueError(f"corpus has splits {sorted(corpus)}; it needs 'train' and 'validation'.")
    if tokenizer is None:
        tokenizer = default_tokenizer(settings.vocab_size, cache_dir=cache_dir)
    rungs = preset_rungs(preset, len(tokenizer), settings.seq_len)
    if only is not None:
        missing = sorted(set(only) - {rung.name for rung in rungs})
        if missing:
            raise ValueError(
                f"the {preset} ladder at a {len(tokenizer)}-token vocabulary has no rung {missing}; its rungs are "
                f"{', '.join(rung.name for rung in rungs)} (the preset's vocabulary is {settings.vocab_size})."
            )
        rungs = [rung for rung in rungs if rung.name in only]
    packed = tokenize_and_pack(
        load_corpus() if corpus is None else corpus, tokenizer, settings.seq_len, num_proc=num_proc
    )
    eval_rows = packed["validation"].select(range(min(settings.eval_rows, len(packed["validation"]))))
    training = {
        item.name: getattr(settings, item.name)
        for item in dataclasses.fields(settings)
        if item.name not in ("vocab_size", "eval_rows")
    }
    return [pretrain(rung, packed["train"], eval_rows, root_dir, tokenizer=tokenizer, **training) for rung in rungs]


def _config_dict(config: LlamaConfig) -> dict[str, Any]:
    values = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        values.pop(volatile, None)
    return values


def _check_inputs(
    config: LlamaConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    seq_len: int,
    max_tokens: int,
    batch_size: int,
    learning_rate: float,
) -> None:
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"config.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens); "
            "build the ladder with vocab_size=len(tokenizer)."
        )
    if batch_size < 1 or learning_rate <= 0 or not math.isfinite(learning_rate):
        raise ValueError(f"batch_size={batch_size} must be >= 1 and learning_rate={learning_rate} > 0.")
    if max_tokens < batch_size * seq_len:
        raise ValueError(
            f"max_tokens={max_tokens} is less than one batch (batch_size*seq_len={batch_size * seq_len}); "
            "raise max_tokens."
        )
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if "input_ids" not in dataset.column_names or len(dataset) == 0:
            raise ValueError(f"{name} must be a non-empty packed dataset with input_ids (use tokenize_and_pack).")
        if len(dataset[0]["input_ids"]) != seq_len:
            raise ValueError(
                f"{name} rows hold {len(dataset[0]['input_ids'])} tokens but seq_len={seq_len}; "
                "pack with this seq_len."
            )
    if config.max_position_embeddings < seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds config.max_position_embeddings={config.max_position_embeddings}.")
