"""The teacher of a MiniMA run: its tokenizer (read first, so data errors come before any weights),
the frozen model through :func:`hf_capgap.models.load_frozen_teacher` (a ladder rung through
:func:`hf_capgap.ladder.load_teacher`, which checks its manifest), and an identity that
names it without hashing billions of weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_capgap.minima.config import MinimaConfig
from hf_capgap.minima.plan import Plan
from hf_capgap.utils.artifacts import json_sha256


def teacher_location(config: MinimaConfig, plan: Plan) -> str:
    """Where the teacher's files are: the ladder rung's folder (pretrained once, resumable), or as given."""
    if plan.teacher_kind != "ladder":
        return plan.teacher
    from hf_capgap.ladder import ensure_ladder

    (path,) = ensure_ladder(config.ladder, config.ladder_dir, only=[plan.teacher])
    return str(path)


def load_tokenizer(config: MinimaConfig, location: str) -> Any:
    """The teacher's tokenizer; a local folder is first checked for everything the run will load from it."""
    from transformers import AutoTokenizer

    from hf_capgap.models import check_model_folder

    if Path(location).is_dir():
        check_model_folder(location)
    return AutoTokenizer.from_pretrained(
        location, revision=config.teacher_revision, trust_remote_code=config.trust_remote_code
    )


def load_teacher(config: MinimaConfig, plan: Plan, location: str) -> Any:
    """The frozen teacher on this process's device (bf16 on a GPU unless teacher_dtype says otherwise),
    through the one loader; a ladder rung goes through the ladder's, which verifies its manifest first."""
    if plan.teacher_kind == "ladder":
        from hf_capgap.ladder import load_teacher as load_ladder_teacher

        return load_ladder_teacher(location, teacher_dtype=config.teacher_dtype).model
    from hf_capgap.models import load_frozen_teacher

    return load_frozen_teacher(
        location,
        teacher_dtype=config.teacher_dtype,
        revision=config.teacher_revision,
        trust_remote_code=config.trust_remote_code,
    )


def load_assistant(config: MinimaConfig, folder: Path) -> Any:
    """A finished assistant (a distilled stage folder) as the frozen teacher of the next stage of the chain."""
    from hf_capgap.models import load_frozen_teacher

    return load_frozen_teacher(folder, teacher_dtype=config.teacher_dtype)


def teacher_identity(plan: Plan, location: str, teacher: Any) -> str:
    """A name for the teacher's weights: file checksums of a ladder rung, the Hub commit, or the
    folder's config and weight file sizes (reading 13 GB to hash a 7B teacher on every rank is not worth it)."""
    folder = Path(location)
    if plan.teacher_kind == "ladder":
        import json

        return json_sha256(json.loads((folder / "capgap_manifest.json").read_text())["files"])[:16]
    if plan.teacher_kind == "hub":
        return json_sha256([plan.teacher, getattr(teacher.config, "_commit_hash", None)])[:16]
    weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    return json_sha256([(folder / "config.json").read_text(), weights])[:16]
