"""Parameter counts as people write them: read ``3B`` / ``350M`` / ``3e9``, write ``70M`` / ``1.4B``."""

from __future__ import annotations

import math
import re

from hf_capgap.errors import ConfigError

_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_PARAMS_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


def parse_params(text: str | float) -> float:
    """Read a parameter count written as ``3e9``, ``3B``, ``350M``, ``70m`` or a plain number."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _PARAMS_PATTERN.match(str(text))
        if match is None:
            raise ConfigError(f"cannot read {text!r} as a parameter count; write it like 3e9, 3B, 350M or 70m.")
        value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"a parameter count must be a positive number, got {text!r}.")
    return value


def format_params(params: float) -> str:
    """Write a parameter count the way model names do: 70M, 1.4B, 6.9B."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return f"{params:.3g}"
