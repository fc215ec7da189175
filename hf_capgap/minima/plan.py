"""Plan a MiniMA run before any expensive work: which teacher, which student, how many tokens and steps.

Everything here runs on configs and meta-device skeletons: no weights are read, nothing is
downloaded beyond a Hub teacher's ``config.json``, and no process group is created. Settings that
cannot work (a student larger than its teacher, a sequence longer than the teacher's positions, a
multi-process launch that would have to prune) are refused here, by field name.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hf_capgap.errors import ConfigError
from hf_capgap.minima.config import EMBEDDED_DATASET, NO_ASSISTANTS, MinimaConfig
from hf_capgap.utils.parameters import count_model_parameters

LADDER_LICENSE = "apache-2.0"  # ladder teachers are trained by hf_capgap (Apache-2.0) on public-domain text
SINGLE_PROCESS_ASSISTANTS = (
    "assistants need a single-process launch (each assistant is pruned in this run); launch with one process, "
    "or set assistants: none"
)


@dataclass(frozen=True)
class Plan:
    """What will be trained, decided before any expensive work."""

    teacher: str
    teacher_kind: str  # "ladder", "local" or "hub"; "assistant" in a chain stage whose teacher is an assistant
    teacher_params: int
    student_params: int
    student_shape: dict[str, int] | None
    choice: str  # how the sizes were chosen, for the table and the card
    seq_len: int
    processes: int
    student_init: str | None = None
    assistants: tuple[Any, ...] = ()  # minima.assistants.Assistant, largest first; () distils straight
    stage_tokens: int | None = None  # this stage's token budget where it is not train_tokens (an assistant's)


def run_settings(config: MinimaConfig, plan: Plan) -> dict[str, Any]:
    """The run's identity: its settings with the planned chain (each assistant's achieved parameters)."""
    return config.result_settings(tuple(assistant.params for assistant in plan.assistants))


def row_tokens(config: MinimaConfig, plan: Plan) -> int:
    """Tokens one training row counts: seq_len off-policy; when the run generates, the student's tokens of the
    row, its prompt and the most it generates (prompt_tokens + max_completion_length, as the sweep counts: a
    completion stopping at EOS counts as full, so the budget is an upper bound)."""
    return config.prompt_tokens + config.max_completion_length if config.generates else plan.seq_len


def row_tokens_name(config: MinimaConfig) -> str:
    """How a row's tokens are named in messages: the fields :func:`row_tokens` reads."""
    return "(prompt_tokens + max_completion_length)" if config.generates else "seq_len"


def tokens_per_step(config: MinimaConfig, plan: Plan) -> int:
    """Tokens of one optimizer step over all processes (rows of :func:`row_tokens`)."""
    return config.batch_size * config.gradient_accumulation_steps * row_tokens(config, plan) * plan.processes


def steps_for(config: MinimaConfig, plan: Plan) -> int:
    """Optimizer steps that spend the stage's tokens: ``train_tokens``, or an assistant's (at least one)."""
    tokens = config.train_token_count if plan.stage_tokens is None else plan.stage_tokens
    return max(1, tokens // tokens_per_step(config, plan))


def make_plan(config: MinimaConfig, processes: int | None = None) -> Plan:
    """Resolve the teacher, the student size and the sequence length; raise on anything impossible.

    ``processes`` defaults to the launch's process count (read from the environment, no group created).
    """
    from hf_capgap.law import format_params
    from hf_capgap.utils.processes import launched_processes

    processes = launched_processes() if processes is None else processes
    if processes > 1 and config.assistants.strip().lower() != NO_ASSISTANTS and not config.dry_run:
        # --prune_only and --student_init, the way around a multi-process prune, are refused with assistants.
        raise ConfigError(
            f"assistants={config.assistants!r}: {SINGLE_PROCESS_ASSISTANTS} (this launch runs {processes} processes)."
        )
    if processes > 1 and config.student_init is None and not config.dry_run:
        raise ConfigError(
            f"this launch runs {processes} processes, but pruning is a one-process stage (it loads the whole teacher "
            "and must not hold the other ranks in a barrier or run inside a sharded group). Prune first, then launch "
            "the distillation from the pruned folder:\n"
            "  python recipes/minima.py CONFIG --prune_only   (one process; prints PRUNED_DIR), or\n"
            "  hf-capgap prune TEACHER_DIR --target-params N --out PRUNED_DIR\n"
            "then: accelerate launch ... recipes/minima.py CONFIG --student_init PRUNED_DIR"
        )
    law = load_law(config)
    rungs = ladder_rungs(config)
    teacher = config.teacher
    choice = ""
    if teacher is None:
        suggestion = law.suggest(config.student_param_count, [rung.params for rung in rungs.values()])
        teacher = next(name for name, rung in rungs.items() if rung.params == suggestion.teacher_params)
        choice = f"law ({law.source}) suggests {teacher} for a {format_params(config.student_param_count)} student"
    kind, skeleton = resolve_teacher(config, teacher, rungs)
    teacher_params = count_model_parameters(skeleton)
    seq_len = resolve_seq_len(config, kind, skeleton)
    check_completion_fits(config, seq_len)
    check_dataset_access(config)
    shape = config.student_shape
    if config.student_init is not None:
        student_params = count_model_parameters(student_skeleton(config.student_init))
        shape = None
        choice = (
            f"student initialised from {Path(config.student_init).name} ({format_params(student_params)}), "
            "not pruned here"
        )
    elif shape is not None:
        from hf_capgap.pruning import PruneShape, shape_params

        student_params = shape_params(skeleton, PruneShape.from_value(shape))
        choice = f"explicit student shape {shape}"
    elif config.student_param_count is not None:
        student_params = config.student_param_count
        if config.teacher is not None:
            choice = f"requested {format_params(student_params)} student"
    else:
        student_params = round(law.student_for(teacher_params).params)
        choice = f"law ({law.source}, {law.formula()}) picks a {format_params(student_params)} student"
    if student_params >= teacher_params:
        field_name = (
            "student_init" if config.student_init else "student_* shape" if shape is not None else "student_params"
        )
        raise ConfigError(
            f"{field_name} gives {student_params:,} parameters but the teacher {teacher} has {teacher_params:,}; "
            "a distilled student must be smaller than its teacher."
        )
    if config.push_to_hub is not None and not config.dry_run:
        require_hub("push_to_hub", config.push_to_hub, config.hub_endpoint)
    from hf_capgap.minima.assistants import plan_assistants

    assistants = plan_assistants(config, law, skeleton, student_params)
    plan = Plan(teacher, kind, teacher_params, student_params, shape, choice, seq_len, processes, config.student_init)
    plan = dataclasses.replace(plan, assistants=assistants)
    budgets = [("train_tokens", config.train_tokens, config.train_token_count)]
    if assistants:
        budgets.append(("assistant_tokens", config.assistant_tokens, config.assistant_token_count))
    for key, value, tokens in budgets:
        if tokens < tokens_per_step(config, plan):
            raise ConfigError(
                f"{key}={value} is less than one optimizer step ({tokens_per_step(config, plan):,} tokens: "
                f"batch_size x gradient_accumulation_steps x {row_tokens_name(config)} x processes); raise {key}."
            )
    return plan


def load_law(config: MinimaConfig) -> Any:
    from hf_capgap.law import CapacityGapLaw

    return CapacityGapLaw.load(config.law) if config.law else CapacityGapLaw.paper()


def ladder_rungs(config: MinimaConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """The ladder's rungs by name, for the preset's vocabulary (or the tokenizer's real size)."""
    from hf_capgap.ladder import preset_rungs

    return {rung.name: rung for rung in preset_rungs(config.ladder, vocab_size)}


def resolve_teacher(config: MinimaConfig, teacher: str, rungs: Mapping[str, Any]) -> tuple[str, Any]:
    """(kind, model on the meta device) of the teacher, from its config alone."""
    from transformers import AutoConfig

    from hf_capgap.pruning.layouts import meta_model

    if teacher in rungs:
        return "ladder", meta_model(rungs[teacher].config)
    if Path(teacher).is_dir():
        if not (Path(teacher) / "config.json").is_file():
            raise FileNotFoundError(f"teacher={teacher} holds no config.json; point it at a saved model folder.")
        kind = "local"
    elif teacher.startswith((".", "/", "~")) or teacher.count("/") != 1:
        raise ConfigError(
            f"teacher={teacher!r} is neither a rung of the {config.ladder} ladder ({', '.join(rungs)}), "
            "an existing model folder, nor a Hub id 'namespace/name'; fix teacher."
        )
    else:
        kind = "hub"
        require_hub("teacher", teacher, None)
    teacher_config = AutoConfig.from_pretrained(
        teacher, revision=config.teacher_revision, trust_remote_code=config.trust_remote_code
    )
    return kind, meta_model(teacher_config)


def student_skeleton(folder: str) -> Any:
    from transformers import AutoConfig

    from hf_capgap.pruning.layouts import meta_model

    return meta_model(AutoConfig.from_pretrained(folder))


def resolve_seq_len(config: MinimaConfig, kind: str, skeleton: Any) -> int:
    """``seq_len``, or the teacher's context when it is null; never longer than the teacher's positions."""
    from hf_capgap.ladder import PRETRAIN_PRESETS

    if kind == "ladder":
        limit, where = PRETRAIN_PRESETS[config.ladder].seq_len, f"the {config.ladder} ladder's"
    else:
        limit = getattr(skeleton.config, "max_position_embeddings", None) or getattr(
            skeleton.config, "n_positions", None
        )
        where = "the teacher's max_position_embeddings"
    if config.seq_len is None:
        if limit is None:
            raise ConfigError(
                "seq_len is null but the teacher's config states no max_position_embeddings; set seq_len."
            )
        return int(limit)
    if limit is not None and config.seq_len > limit:
        raise ConfigError(f"seq_len={config.seq_len} exceeds {where} {limit}; set seq_len <= {limit}.")
    return config.seq_len


def check_completion_fits(config: MinimaConfig, seq_len: int) -> None:
    """When the run generates, each prompt and its completion are cut from / fit in one packed row of the planned
    ``seq_len`` (the setting, or the teacher's context when it is null)."""
    if config.generates and config.prompt_tokens + config.max_completion_length > seq_len:
        source = f"seq_len={seq_len}" if config.seq_len is not None else f"seq_len={seq_len} (null: the teacher's)"
        raise ConfigError(
            f"prompt_tokens={config.prompt_tokens} + max_completion_length={config.max_completion_length} exceeds "
            f"{source}: prompts are cut from packed rows of seq_len tokens; lower prompt_tokens or "
            "max_completion_length."
        )


def check_dataset_access(config: MinimaConfig) -> None:
    """Local files must exist and share one format; a Hub dataset needs the Hub (not for a dry run)."""
    from hf_capgap.minima.data import is_local_dataset, local_data_files

    if config.dataset == EMBEDDED_DATASET:
        return
    if is_local_dataset(config.dataset):
        local_data_files(config.dataset)
    elif not config.dry_run:
        require_hub("dataset", config.dataset, None)


def require_hub(key: str, name: str, endpoint: str | None) -> None:
    """Refuse a Hub name when the Hub cannot be used, naming the key that needs it."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ConfigError(
            f"{key}={name!r} needs the Hugging Face Hub but HF_HUB_OFFLINE is set; unset it, or set {key} "
            "to something local (a ladder rung, a folder or local files)."
        )
    url = urlparse(endpoint or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        raise ConfigError(
            f"{key}={name!r} needs the Hub at {url.geturl()}, which is unreachable ({err}); "
            f"connect, or use a local {key}."
        ) from None


def teacher_hub_id(config: MinimaConfig, plan: Plan) -> str | None:
    """The teacher's Hub id for the card's ``base_model``, never a local path; None when there is none.

    A local folder names its origin in the ``_name_or_path`` of its saved config.json when it was
    downloaded from the Hub and re-saved.
    """
    if config.teacher_hub_id is not None:
        return config.teacher_hub_id
    if plan.teacher_kind == "hub":
        return plan.teacher
    if plan.teacher_kind == "local":
        saved = json.loads((Path(plan.teacher) / "config.json").read_text())
        name = str(saved.get("_name_or_path") or "")
        if is_hub_id(name):
            return name
    return None


def is_hub_id(name: str) -> bool:
    """'namespace/name' that is not a path on this machine."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()
