"""Teacher assistants of the sweep's chained cells (TAKD, Mirzadeh et al. 2020; issue 21).

A chained cell ``(student, teacher)`` with assistants ``(a1, a2, ...)`` (largest first) distils ``a1`` from the
teacher, ``a2`` from ``a1``, ... and the student from the last one. Each assistant is a sweep cell whose student is
the assistant's size (:func:`~hf_capgap.sweep.cell.distill_cell`): pruned from the model above it and distilled
from it, online, on ``assistant_tokens`` tokens (the first rows of the training split), with seed
:data:`ASSISTANT_SEED` whatever the sweep's seed, so one assistant serves every cell and seed that shares it.

It is saved once under ``<output_dir>/assistants/<key>`` (model, tokenizer and a manifest holding what it measured),
atomically, so a killed build leaves nothing and the next run builds it again. The key reads
``<teacher>-to-<chain down to the assistant>-<hash>``; the hash covers the settings it was trained with (its token
budget included), the exact sizes of the chain (``60K`` may be 60,000 or 60,040) and the teacher's fingerprint (its
config and weights: another ladder_dir or a retrained teacher is another assistant). The manifest holds all three
and is checked when the assistant is read back; a mismatch is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hf_capgap.law import format_params
from hf_capgap.sweep.cell import distill_cell
from hf_capgap.sweep.config import RunSpec, SweepConfig
from hf_capgap.utils.artifacts import (
    atomic_directory,
    json_sha256,
    model_fingerprint,
    read_manifest,
    write_manifest,
)

ASSISTANTS_DIR = "assistants"
ASSISTANT_KIND = "sweep-assistant"
ASSISTANT_FORMAT_VERSION = 2
ASSISTANT_SEED = 0
"""Every assistant trains with this seed: seeds vary the students of a chained cell, not its assistants."""
ASSISTANT_FIELDS = ("student_target", "student_params", "tokens", "pruned_eval_loss", "eval_loss", "wall_seconds")
"""What a chained record keeps of each assistant (plus ``distilled_from`` and ``path``)."""


def assistant_config(config: SweepConfig) -> SweepConfig:
    """How an assistant trains: the sweep's settings with its own budget and seed, reading its teacher online."""
    return dataclasses.replace(
        config,
        tokens_per_run=config.assistant_token_budget,
        seed=ASSISTANT_SEED,
        cache_mode="online",
        assistants=[],
        assistant_tokens=None,
    )


def assistant_identity(config: SweepConfig, sizes: tuple[int, ...], teacher_fingerprint: str) -> dict[str, Any]:
    """What makes the assistant ``sizes[-1]`` of the chain teacher -> sizes[0] -> ... what it is: the hash of its
    training settings (cache settings do not matter: assistants read their teacher online), the chain's exact
    sizes and the teacher's fingerprint."""
    settings = assistant_config(config).settings()
    for unused in ("cache_k", "cache_sampler"):
        settings.pop(unused)
    return {
        "settings_sha256": json_sha256(settings),
        "chain": [int(size) for size in sizes],
        "teacher_fingerprint": teacher_fingerprint,
    }


def assistant_dir(config: SweepConfig, teacher: str, sizes: tuple[int, ...], teacher_fingerprint: str) -> Path:
    """The folder of the assistant ``sizes[-1]`` of the chain teacher -> sizes[0] -> ...: a readable prefix and a
    hash of its :func:`assistant_identity`."""
    chain = "-to-".join(format_params(size) for size in sizes)
    digest = json_sha256(assistant_identity(config, sizes, teacher_fingerprint))[:12]
    return Path(config.output_dir) / ASSISTANTS_DIR / f"{teacher.rsplit('/', 1)[-1]}-to-{chain}-{digest}"


def ensure_assistants(
    config: SweepConfig, spec: RunSpec, teacher: Any, data: dict[str, Any], tokenizer: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """The last assistant of ``spec``'s chain (frozen, the student's teacher) and one entry per assistant, largest
    first; assistants missing on disk are built from the model above them, the others are read back."""
    from hf_capgap.models import load_frozen_teacher

    train_config = assistant_config(config)
    train_data = {**data, "train": data["assistant_train"]}
    fingerprint = model_fingerprint(teacher)
    above, above_name, chain = teacher, spec.teacher, []
    for depth in range(1, len(spec.assistants) + 1):
        sizes = spec.assistants[:depth]
        folder = assistant_dir(config, spec.teacher, sizes, fingerprint)
        identity = assistant_identity(config, sizes, fingerprint)
        if not folder.is_dir():
            if above is None:
                above = load_frozen_teacher(above_name, teacher_dtype=config.teacher_dtype)
            model, record = distill_cell(sizes[-1], above, None, train_data, tokenizer, train_config)
            fields = {**{name: record[name] for name in ASSISTANT_FIELDS}, "distilled_from": str(above_name)}
            with atomic_directory(folder, overwrite=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                write_manifest(tmp, ASSISTANT_KIND, ASSISTANT_FORMAT_VERSION, {**fields, **identity})
            del model
        manifest = read_manifest(folder, ASSISTANT_KIND, ASSISTANT_FORMAT_VERSION, expected=identity)
        chain.append({**{name: manifest[name] for name in (*ASSISTANT_FIELDS, "distilled_from")}, "path": str(folder)})
        above, above_name = None, str(folder)
    return load_frozen_teacher(above_name, teacher_dtype=config.teacher_dtype), chain
