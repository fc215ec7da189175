"""Sweep records: the one reader of a sweep ledger, and the checked (student, teacher, loss) rows a fit uses.

A ledger is the JSON-lines file a sweep appends one record to per finished run. Both the sweep (to
skip finished runs) and the law (to fit) read it through :func:`read_ledger`, so a ledger the sweep
accepts is one the law can fit.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_capgap.errors import ConfigError
from hf_capgap.law.params import format_params, parse_params
from hf_capgap.utils.artifacts import ArtifactError

REQUIRED_FIELDS = ("student_params", "teacher_params", "eval_loss")
STUDENT_SIZE_TOLERANCE = 0.02
"""Students within 2% of each other are one size: pruning hits a target within 2%, so the "same"
student cut from different teachers has slightly different exact counts."""


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
        raise ConfigError(f"is not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ConfigError("is not a JSON object (each line must be one record)")
    missing = [field for field in required_fields if field not in record]
    if missing:
        raise ConfigError(f"is not a sweep record (it lacks {', '.join(missing)})")
    return record


def read_records(records: Any) -> list[Mapping[str, Any]]:
    """The rows of a ledger path, a DataFrame or an iterable of dicts, unchecked."""
    if isinstance(records, (str, os.PathLike)):
        return read_ledger(records)
    if hasattr(records, "columns") and hasattr(records, "to_dict"):
        return records.to_dict("records")
    if isinstance(records, Mapping):
        raise ConfigError("records must be a ledger path, a list of dicts or a DataFrame, not a single dict.")
    return list(records)


def validated_records(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows as dicts of numbers (student_params, teacher_params, eval_loss, family if a string); ValueError
    naming the first bad one.

    The law measures direct distillation from ``teacher_params``, so :func:`is_direct` leaves out a chained record
    (its student learnt from an assistant) and a TAID record (its student learnt from an interpolation of itself and
    the teacher): a sweep's ledger may hold them beside the direct cells."""
    if not rows:
        raise ConfigError(
            "no sweep records: the law needs evaluated (student_params, teacher_params, eval_loss) records."
        )
    clean: list[dict[str, Any]] = []
    settings: list[Any] = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(f"record {index} is a {type(row).__name__}, not a dict of fields.")
        if not is_direct(row):
            continue
        missing = [field for field in REQUIRED_FIELDS if field not in row or row[field] is None]
        if missing:
            raise ConfigError(
                f"record {index} lacks {', '.join(missing)}; every record needs {', '.join(REQUIRED_FIELDS)}."
            )
        student = _record_size(row, "student_params", index)
        teacher = _record_size(row, "teacher_params", index)
        if teacher <= student:
            raise ConfigError(
                f"record {index}: teacher_params ({format_params(teacher)}) must be larger than "
                f"student_params ({format_params(student)}); the student is pruned from its teacher."
            )
        try:
            loss = float(row["eval_loss"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"record {index}: eval_loss {row['eval_loss']!r} is not a number.") from err
        if not math.isfinite(loss):
            raise ConfigError(
                f"record {index} (student {format_params(student)}, teacher {format_params(teacher)}): "
                f"eval_loss is {loss}; rerun that evaluation or drop the record."
            )
        record = {"student_params": student, "teacher_params": teacher, "eval_loss": loss}
        if isinstance(row.get("family"), str):
            record["family"] = row["family"]
        clean.append(record)
        settings.append(row.get("settings"))
    if not clean:
        raise ConfigError(
            "no direct sweep records: each one is chained (has assistants) or made with loss taid; the law is "
            "fitted from direct distillation records."
        )
    _check_one_regime(clean, settings)
    return clean


def _check_one_regime(records: Sequence[Mapping[str, Any]], settings: Sequence[Any]) -> None:
    """Refuse records of one (student, teacher) cell made with other settings than each other (``seed`` aside):
    :func:`curves` averages a cell's records as repeats, which runs of another regime (on- and off-policy, another
    loss) are not. Records without ``settings`` pass."""
    group_of = _student_groups(record["student_params"] for record in records)
    first: dict[tuple[float, float], tuple[int, Mapping[str, Any]]] = {}
    for index, (record, values) in enumerate(zip(records, settings, strict=True)):
        if not isinstance(values, Mapping):
            continue
        values = {key: value for key, value in values.items() if key != "seed"}
        cell = (group_of[record["student_params"]], record["teacher_params"])
        if cell not in first:
            first[cell] = (index, values)
            continue
        _, seen = first[cell]
        differing = differing_settings(seen, values)
        if differing:
            shown = ", ".join(f"{key} {first_value} vs {value}" for key, (first_value, value) in differing.items())
            raise ConfigError(
                f"the ledger mixes runs made with other settings ({shown}) in the cell of student "
                f"{format_params(cell[0])} and teacher {format_params(cell[1])}: fit one sweep's ledger at a time "
                f"(differing keys: {', '.join(differing)})."
            )


_UNSET = "unset"


def differing_settings(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between two records' settings, sorted, each with both values (``"unset"``
    where one side lacks the key)."""
    values = {key: (first.get(key, _UNSET), second.get(key, _UNSET)) for key in sorted({*first, *second})}
    return {key: pair for key, pair in values.items() if pair[0] != pair[1]}


def is_direct(row: Mapping[str, Any]) -> bool:
    """A record of direct distillation: not chained (a non-empty sequence of ``assistants``: a list, or the array
    a DataFrame read from parquet holds; a DataFrame gives the direct rows of a mixed ledger NaN there) and not
    made with ``loss: taid`` (its ``settings``)."""
    assistants = row.get("assistants")
    if not isinstance(assistants, (str, bytes, Mapping)) and hasattr(assistants, "__len__") and len(assistants) > 0:
        return False
    settings = row.get("settings")
    return not (isinstance(settings, Mapping) and settings.get("loss") == "taid")


def _record_size(row: Mapping[str, Any], field: str, index: int) -> float:
    try:
        return parse_params(row[field])
    except ValueError as err:
        raise ConfigError(f"record {index}: {field}: {err}") from err


def _student_groups(sizes: Iterable[float]) -> dict[float, float]:
    """Map every student size to its group's median, grouping sorted sizes within the tolerance."""
    groups: list[list[float]] = []
    for size in sorted(set(sizes)):
        if groups and size <= groups[-1][0] * (1 + STUDENT_SIZE_TOLERANCE):
            groups[-1].append(size)
        else:
            groups.append([size])
    return {size: float(np.median(group)) for group in groups for size in group}


def curves(rows: Sequence[Mapping[str, Any]]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Per student size: sorted teacher sizes and the mean loss at each (repeats are averaged)."""
    group_of = _student_groups(row["student_params"] for row in rows)
    grouped: dict[float, dict[float, list[float]]] = {}
    for row in rows:
        grouped.setdefault(group_of[row["student_params"]], {}).setdefault(row["teacher_params"], []).append(
            row["eval_loss"]
        )
    return {
        student: (
            np.array(sorted(by_teacher)),
            np.array([np.mean(by_teacher[t]) for t in sorted(by_teacher)]),
        )
        for student, by_teacher in grouped.items()
    }
