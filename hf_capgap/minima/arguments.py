"""Reading a MinimaConfig (a YAML preset, command-line overrides, or a mapping) and checking its values.

Checks only read the settings: no model, dataset or ``TrainingArguments`` is built (under DeepSpeed ZeRO-3
building one would partition every model loaded afterwards, teacher included).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.minima.config import LR_SCHEDULERS, NO_ASSISTANTS, STUDENT_SHAPE_FIELDS, MinimaConfig

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
    check_types(config)
    check_values(config)
    return config


def check_types(config: MinimaConfig) -> None:
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
            raise ConfigError(f"{item.name}={value!r} is not {wanted}; set {item.name} to {wanted}.")


def check_values(config: MinimaConfig) -> None:
    """Reject impossible settings by field name; nothing is loaded, built or trained here.

    The checks run in this order, so a config with several faults is told the first of them."""
    _check_batches_and_tokens(config)
    _check_learning_rate_schedule(config)
    _check_loss(config)
    _check_ladder_and_layer_selection(config)
    _check_teacher_signal(config)
    _check_run_name(config)
    _check_teacher_choice(config)
    _check_student(config)
    _check_assistants(config)
    _check_hub_ids(config)
    _check_files_exist(config)


def _check_batches_and_tokens(config: MinimaConfig) -> None:
    """Counts are positive, a row predicts something and the token budget holds one optimizer step."""
    positive = (
        "batch_size",
        "gradient_accumulation_steps",
        "calibration_batches",
        "eval_rows",
        "eval_batch_size",
        "save_steps",
        "logging_steps",
    )
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} must be >= 1.")
    if config.seq_len is not None and config.seq_len < 2:
        raise ConfigError(f"seq_len={config.seq_len} must be >= 2 (a row predicts its next tokens).")
    tokens = config.train_token_count
    if config.generates:  # rows of prompt + completion (minima.plan.row_tokens), whatever seq_len
        row, row_name = config.prompt_tokens + config.max_completion_length, "(prompt_tokens+max_completion_length)"
    else:
        row, row_name = config.seq_len, "seq_len"
    if row is not None and tokens < config.batch_size * config.gradient_accumulation_steps * row:
        raise ConfigError(
            f"train_tokens={config.train_tokens} is less than one optimizer step "
            f"(batch_size*gradient_accumulation_steps*{row_name}); raise train_tokens."
        )


def _check_learning_rate_schedule(config: MinimaConfig) -> None:
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise ConfigError(f"learning_rate={config.learning_rate} must be a positive number.")
    if not 0 <= config.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio={config.warmup_ratio} must be in [0, 1).")
    if config.lr_scheduler_type not in LR_SCHEDULERS:
        raise ConfigError(f"lr_scheduler_type={config.lr_scheduler_type!r} must be one of {', '.join(LR_SCHEDULERS)}.")


def _check_loss(config: MinimaConfig) -> None:
    """The divergences every entry point offers, or TAID with a schedule it can run."""
    from hf_capgap.losses import LOSSES

    config.check_distillation_settings(LOSSES)
    config.check_taid_settings()
    config.check_on_policy_settings()
    if not config.generates:
        return
    what = f"lmbda={config.lmbda}" if config.lmbda > 0 else "seq_kd=true"
    for name, bad, fix in (
        ("teacher_cache", config.teacher_cache, "a cache cannot score generated tokens; set teacher_cache: false"),
        ("streaming", config.streaming, "prompts are cut from materialised rows; set streaming: false"),
        ("prompt_tokens", config.prompt_tokens < 1, "give each prompt at least 1 token"),
    ):
        if bad:
            raise ConfigError(f"{what} with {name}={getattr(config, name)}: {fix}, or lmbda: 0 and seq_kd: false.")
    if config.seq_len is not None and config.prompt_tokens + config.max_completion_length > config.seq_len:
        raise ConfigError(
            f"prompt_tokens={config.prompt_tokens} + max_completion_length={config.max_completion_length} exceeds "
            f"seq_len={config.seq_len}; lower prompt_tokens or max_completion_length."
        )


def _check_ladder_and_layer_selection(config: MinimaConfig) -> None:
    from hf_capgap.ladder import LADDERS
    from hf_capgap.pruning import LAYER_SELECTIONS

    if config.ladder not in LADDERS:
        raise ConfigError(f"ladder={config.ladder!r} is unknown; choose one of {sorted(LADDERS)}.")
    if config.layer_selection not in LAYER_SELECTIONS:
        raise ConfigError(f"layer_selection={config.layer_selection!r} must be one of {LAYER_SELECTIONS}.")


def _check_teacher_signal(config: MinimaConfig) -> None:
    """The cache mode is one the cache knows, and a cache gets the fixed rows it is built from."""
    from hf_capgap.cache.format import MODES

    if config.teacher_cache or config.loss != "taid":
        config.check_teacher_signal(config.cache_mode, MODES)
    else:  # TAID from the online teacher, which holds every logit; the unused cache settings are still checked
        if config.cache_mode not in MODES:
            raise ConfigError(f"cache_mode={config.cache_mode!r} must be one of {', '.join(MODES)}.")
        config.check_teacher_signal("dense", MODES)
    if config.teacher_cache and config.streaming:
        raise ConfigError(
            "teacher_cache needs a fixed set of training rows; set streaming: false or teacher_cache: false."
        )


def _check_run_name(config: MinimaConfig) -> None:
    if not config.run_name or "/" in config.run_name or config.run_name.startswith("."):
        raise ConfigError(f"run_name={config.run_name!r} must be a plain folder name such as 'minima-tiny'.")


def _check_teacher_choice(config: MinimaConfig) -> None:
    if config.teacher is None and config.student_params is None:
        raise ConfigError(
            "set teacher (a ladder rung, folder or Hub id) or student_params (the law picks the teacher)."
        )


def _check_student(config: MinimaConfig) -> None:
    """The student is given one way (a size, a full shape or neither) and any folder it starts from exists."""
    config.student_param_count  # noqa: B018 - parses, raising on a bad count
    shape = [getattr(config, name) for name in STUDENT_SHAPE_FIELDS]
    if any(value is None for value in shape) and any(value is not None for value in shape):
        raise ConfigError(f"give all of {', '.join(STUDENT_SHAPE_FIELDS)} or none of them.")
    if config.student_shape is not None and config.student_params is not None:
        raise ConfigError("set either student_params or the student_* shape fields, not both (student_params: null).")
    if config.student_shape is not None and min(shape) < 1:
        raise ConfigError(f"student shape {config.student_shape} must hold positive sizes.")
    if config.student_init is not None and not (Path(config.student_init) / "config.json").is_file():
        raise FileNotFoundError(
            f"student_init={config.student_init} holds no config.json; point it at a saved student folder "
            "(e.g. written by `hf-capgap prune`)."
        )


def _check_assistants(config: MinimaConfig) -> None:
    """'none', 'auto' or decreasing sizes, a token budget of at least one step, and a run that prunes them."""
    config.assistant_token_count  # noqa: B018 - parses, raising on a bad count
    if config.assistants.strip().lower() == NO_ASSISTANTS:
        return
    config.assistant_sizes  # noqa: B018 - parses, raising on a bad list
    if config.student_init is not None or config.prune_only:
        field_name = "student_init" if config.student_init is not None else "prune_only"
        raise ConfigError(
            f"assistants={config.assistants!r} are pruned and distilled in this run, one after another, which "
            f"{field_name} skips; set assistants: none, or unset {field_name}."
        )


def _check_hub_ids(config: MinimaConfig) -> None:
    if config.push_to_hub is not None and "/" not in config.push_to_hub:
        raise ConfigError(f"push_to_hub={config.push_to_hub!r} must be 'namespace/name'.")
    if config.teacher_hub_id is not None and config.teacher_hub_id.count("/") != 1:
        raise ConfigError(f"teacher_hub_id={config.teacher_hub_id!r} must be a Hub id 'namespace/name'.")


def _check_files_exist(config: MinimaConfig) -> None:
    """The law and accelerate config files named exist (before anything runs)."""
    if config.law is not None and not Path(config.law).is_file():
        raise FileNotFoundError(
            f"law={config.law} does not exist; write one with `hf-capgap law fit` or set law: null."
        )
    if config.accelerate_config is not None and not Path(config.accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate_config={config.accelerate_config} does not exist.")
