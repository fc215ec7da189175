"""The one reader of a sweep ledger: the JSON-lines file a sweep appends one record to per finished run.

Both the sweep (to skip finished runs) and the law (to fit) read it through :func:`read_ledger`, so
a ledger the sweep accepts is one the law can fit.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_capgap.utils.artifacts import ArtifactError


def read_ledger(path: str | os.PathLike, *, required_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The records of a ledger, in file order; a torn last line is dropped with a warning.

    A kill in the middle of a write leaves a last line without its newline that is not a whole
    record: that run did not finish, so it is left out and will be redone. A malformed line anywhere
    else (or a last line ended by a newline) means the file was edited or damaged: ArtifactError
    names it. A line counts as a record when it is a JSON object holding every ``required_fields``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep ledger at {path}; pass the JSON-lines file the sweep wrote.")
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = _parse_record(line, required_fields)
        except ValueError as err:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{path}: dropped a torn last line (an interrupted write).", stacklevel=2)
                continue
            raise ArtifactError(f"{path} line {number} {err}; fix or remove that line.") from err
        records.append(record)
    return records


def _parse_record(line: str, required_fields: Sequence[str]) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"is not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError("is not a JSON object (each line must be one record)")
    missing = [field for field in required_fields if field not in record]
    if missing:
        raise ValueError(f"is not a sweep record (it lacks {', '.join(missing)})")
    return record
