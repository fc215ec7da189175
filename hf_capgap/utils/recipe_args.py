"""The one way recipes read their settings: a YAML preset, then ``--key value`` overrides, through
``transformers.HfArgumentParser`` (so ``--help`` lists every field with its help text).

YAML values become parser defaults, which argparse types like command-line strings; a YAML number
given for a text field (``student_params: 170000``) is kept as its text. Unknown keys are refused by
name, before anything runs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hf_capgap.errors import ConfigError


def field_help(text: str) -> dict[str, Any]:
    """The ``dataclasses.field`` metadata that ``HfArgumentParser`` shows as a setting's ``--help`` text
    (argparse %-formats help strings, so a literal ``%`` is doubled)."""
    return {"help": text.replace("%", "%%")}


def read_preset(path: str | Path, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """A preset's key: value mapping, checked against the fields of ``dataclass_types``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML preset from recipes/configs/.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of key: value, got {type(values).__name__}.")
    return known_values(values, dataclass_types, str(path))


def known_values(values: Mapping[str, Any], dataclass_types: Sequence[type], where: str) -> dict[str, Any]:
    known = {item.name for kind in dataclass_types for item in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; valid keys: {', '.join(sorted(known))}.")
    return dict(values)


def parse_with_preset(
    dataclass_types: Sequence[type], values: Mapping[str, Any], argv: Sequence[str], *, description: str
) -> tuple[Any, ...]:
    """The dataclasses from ``values`` (a preset) overridden by ``argv``; argparse errors become ValueError."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclass_types), description=description)
    hints = {name: hint for kind in dataclass_types for name, hint in typing.get_type_hints(kind).items()}
    parser.set_defaults(**{key: _as_text_if_wanted(value, hints[key]) for key, value in values.items()})
    try:
        return tuple(parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=False))
    except SystemExit as err:  # argparse printed the usage and the reason already
        if err.code == 0:  # --help
            raise
        raise ConfigError(
            f"could not read the settings {list(argv) or dict(values)}; see the message above and --help."
        ) from None


def split_preset(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [--key value ...]`` -> (the preset path or None, the overrides)."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def _as_text_if_wanted(value: Any, hint: Any) -> Any:
    wants_text = hint is str or str in typing.get_args(hint)
    if wants_text and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value
