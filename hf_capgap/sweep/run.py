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
    caches/<teacher>  one TeacherCache per teacher, shared by all of its students (``run_cell`` with another
                      seed: ``caches/<teacher>-seed<N>``)
    assistants/<key>  the teacher assistants of chained cells (``assistants: auto | [sizes]``), each built
                      once and shared by the cells that use it (hf_capgap.sweep.assistants)
    law.json law.png  the fitted law, or law_failure.json saying why it could not be fitted

A killed sweep restarts where it stopped: finished runs are read from the ledger and skipped, a
torn last ledger line is dropped, teacher caches resume shard by shard, and the interrupted run is
redone from its start.

One sweep at a time works in an output directory: :func:`run_sweep` takes an exclusive ``flock`` on
``.sweep.lock`` (the kernel releases it when the process dies, even by SIGKILL) and a second sweep on
the same folder is refused. Holding the lock, it removes every ``.run-*`` scratch folder it finds:
only the lock holder creates them, so any found at start belong to a killed sweep.

With ``assistants``, a chained cell ``110K-from-llama-963K-via-467K-227K`` runs beside each direct cell
whose teacher is past the student's reach: its student is pruned from the last assistant and distilled from
it, and its record lists the assistants (size, held-out loss, tokens, wall seconds) under ``assistants``; the
law is fitted from the direct cells only.

A run whose student diverged (a non-finite ``eval_loss``) is a finished record like any other;
``redo_failed: true`` drops those records and runs them again (with the same settings, so a
divergence the settings cause comes back: change them in a new ``output_dir`` then).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.law import CapacityGapLaw, format_params, parse_params
from hf_capgap.law.records import differing_settings
from hf_capgap.sweep.assistants import ensure_assistants
from hf_capgap.sweep.cell import build_cache, distill_cell, evaluate_loss
from hf_capgap.sweep.config import HUB_FAMILIES, RunSpec, SweepConfig, plan
from hf_capgap.sweep.ledger import (
    LAW_FAILURE_FILE,
    LAW_FILE,
    LAW_PLOT_FILE,
    LEDGER_FILE,
    LEDGER_FORMAT_VERSION,
    LOCK_FILE,
    RUNNING_FILE,
    SCRATCH_PREFIX,
    append_record,
    diverged_note,
    finished_records,
    format_status,
    is_failed,
    sweep_status,
    write_ledger,
)
from hf_capgap.sweep.teachers import TeacherSource, check_hub_access
from hf_capgap.utils.artifacts import atomic_write_json, json_sha256

# What transformers.utils.logging.get_logger returns for a name outside "transformers", without importing
# transformers here (it would make `import hf_capgap.sweep` slow).
logger = logging.getLogger(__name__)


def run_sweep(config: SweepConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run every planned run missing from the ledger (with ``redo_failed``, also those that diverged), then
    fit the law; return the ledger records.

    One process runs the grid, run after run (the ledger has one writer); each run is small. ``progress``
    shows progress bars; what the sweep found is logged, and :func:`sweep_report` tells it to a user.
    """
    from hf_capgap.utils.processes import process_state

    processes = process_state().num_processes
    if processes > 1:
        raise ConfigError(
            f"the sweep was launched as {processes} processes; it runs its grid in one "
            "process with one ledger writer. Start it with `python recipes/sweep.py CONFIG`."
        )
    output_dir = Path(config.output_dir)
    specs = plan(config)
    _log_unchained_pairs(config, specs)
    if config.family in HUB_FAMILIES:
        check_hub_access(list(dict.fromkeys(spec.teacher for spec in specs)))
    output_dir.mkdir(parents=True, exist_ok=True)
    with _sweep_lock(output_dir):
        _remove_stale_scratch(output_dir)
        settings_sha = json_sha256(config.settings())
        finished = finished_records(output_dir)
        foreign = [record for record in finished if record["settings_sha256"] != settings_sha]
        if foreign:
            raise ConfigError(
                f"{output_dir / LEDGER_FILE} holds runs {[record['run_id'] for record in foreign]} made with other "
                f"settings{_differing_settings(foreign[0], config.settings())}; use another output_dir or the "
                "settings those runs used."
            )
        failed = [record["run_id"] for record in finished if is_failed(record)]
        if failed and config.redo_failed:
            finished = [record for record in finished if record["run_id"] not in failed]
            write_ledger(output_dir, finished)
        elif failed:
            logger.info(diverged_note(finished))
        done = {record["run_id"] for record in finished}
        pending = [spec for spec in specs if spec.run_id not in done]
        if pending:
            _run_pending(config, pending, settings_sha, progress)
        logger.info(format_status(sweep_status(config)))
        by_id = {record["run_id"]: record for record in finished_records(output_dir)}
        records = [by_id[spec.run_id] for spec in specs]
        fit_and_save_law(records, output_dir)
    return records


def sweep_report(config: SweepConfig) -> str:
    """What a user of the sweep must see once it has run: the progress table, the runs that diverged, and
    the fitted law or why it could not be fitted."""
    output_dir = Path(config.output_dir)
    lines = [format_status(sweep_status(config))]
    note = diverged_note(finished_records(output_dir))
    if note:
        lines.append(note)
    if (output_dir / LAW_FILE).is_file():
        lines.append(CapacityGapLaw.load(output_dir / LAW_FILE).summary())
    elif (output_dir / LAW_FAILURE_FILE).is_file():
        lines.append(
            f"the law could not be fitted: {json.loads((output_dir / LAW_FAILURE_FILE).read_text())['error']}"
        )
    return "\n".join(lines)


def _log_unchained_pairs(config: SweepConfig, specs: Sequence[RunSpec]) -> None:
    """One line per pair that explicit ``assistants`` sizes leave without a chained cell (none lies between its
    student and teacher): it runs direct only."""
    if not config.assistants or config.assistants == ["auto"]:
        return
    chained = {(spec.student_params, spec.teacher) for spec in specs if spec.assistants}
    for spec in specs:
        if not spec.assistants and (spec.student_params, spec.teacher) not in chained:
            logger.info(
                f"assistants {config.assistants}: none lies between student {format_params(spec.student_params)} "
                f"and teacher {spec.teacher}; {spec.run_id} runs direct only"
            )


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
            raise ConfigError(
                f"another sweep (process {holder}) is running in output_dir={output_dir}; wait for it to finish "
                "or use another output_dir."
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _remove_stale_scratch(output_dir: Path) -> None:
    """Remove the ``.run-*`` scratch folders a killed sweep left (SIGKILL skips the cleanup of
    ``cell.scratch_dir``). Call only under :func:`_sweep_lock`: its holder alone creates them, so all found are
    stale."""
    for path in sorted(output_dir.glob(f"{SCRATCH_PREFIX}*")):
        if path.is_dir():
            logger.warning(f"removing {path}, scratch of a sweep run that was killed")
            shutil.rmtree(path)


def fit_and_save_law(records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> CapacityGapLaw | None:
    """Fit the law and write law.json + law.png, or law_failure.json with the reason; never a guess. The fit's
    warnings (e.g. a weak fit) are logged as notes."""
    output_dir = Path(output_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            law = CapacityGapLaw.fit(records)
        except ValueError as err:
            (output_dir / LAW_FILE).unlink(missing_ok=True)
            (output_dir / LAW_PLOT_FILE).unlink(missing_ok=True)
            atomic_write_json(output_dir / LAW_FAILURE_FILE, {"error": str(err), "runs": len(records)})
            logger.info(f"the law could not be fitted: {err}")
            return None
    law.save(output_dir / LAW_FILE)
    law.plot(output_dir / LAW_PLOT_FILE)
    (output_dir / LAW_FAILURE_FILE).unlink(missing_ok=True)
    logger.info(law.summary())
    for warning in caught:
        logger.warning(f"note: {warning.message}")
    return law


def run_cell(config: SweepConfig, student_size: str | int, teacher: str, seed: int | None = None) -> dict[str, Any]:
    """Run one cell of ``config``'s grid and return its record, as the sweep's ledger would hold it (the ledger
    is not written: the caller keeps the record).

    The cell is direct when ``config.assistants`` is none, else the chained cell ``config`` plans for the pair
    (a ConfigError when the teacher is within reach of the student); its assistants are built under
    ``output_dir/assistants`` or reused from there. ``seed`` replaces ``config.seed``; a teacher cache of another
    seed is kept apart from the sweep's, under ``caches/<teacher>-seed<seed>``. Holds the sweep's lock on
    ``output_dir`` while it runs. A pair outside ``config``'s grid is refused before any work.
    """
    size = str(student_size)
    _check_in_grid(config, size, teacher)
    cache_suffix = "" if seed is None or seed == config.seed else f"-seed{seed}"
    overrides = {"student_sizes": [size], "teachers": [teacher]}
    config = dataclasses.replace(config, **overrides, **({} if seed is None else {"seed": seed}))
    specs = [spec for spec in plan(config) if bool(spec.assistants) == bool(config.assistants)]
    if not specs:
        raise ConfigError(
            f"assistants={config.assistants} plans no assistant between teacher {teacher} and student {size}; "
            "the teacher is within reach: run the direct cell (assistants: none)."
        )
    if config.family in HUB_FAMILIES:
        check_hub_access([teacher])
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _sweep_lock(output_dir):
        _remove_stale_scratch(output_dir)
        source = TeacherSource(config, teacher)
        data = source.data()
        model, teacher_params = source.load(teacher)
        teacher_eval = evaluate_loss(model, data["eval"], config.batch_size)
        # A chained cell learns from its last assistant's cache: the big teacher's own is never read.
        direct = not specs[0].assistants
        cache_path = (
            _teacher_cache(config, model, teacher + cache_suffix, data, source.tokenizer, progress=False)
            if direct
            else None
        )
        record = _run_spec(specs[0], model, cache_path, data, source.tokenizer, config, False, cache_suffix)
        return _ledger_record(record, config, teacher_params, teacher_eval, json_sha256(config.settings()))


def _differing_settings(record: dict[str, Any], settings: dict[str, Any]) -> str:
    """`` (lmbda: 'unset' there, 1.0 here ...)``: the settings a ledger record was made with that differ from
    ``settings``, or nothing for a record that does not carry its settings."""
    theirs = record.get("settings")
    if not isinstance(theirs, dict):
        return ""
    differing = differing_settings(theirs, settings)
    shown = ", ".join(f"{key}: {there!r} there, {here!r} here" for key, (there, here) in list(differing.items())[:6])
    return f" ({shown}{', ...' if len(differing) > 6 else ''})" if differing else ""


def _check_in_grid(config: SweepConfig, size: str, teacher: str) -> None:
    """Refuse a (student, teacher) pair that is not a cell of ``config``'s grid, naming the grid's cells."""
    try:
        student = int(parse_params(size))
    except ValueError:
        student = None
    cells = {(spec.student_params, spec.teacher): spec.run_id for spec in plan(config) if not spec.assistants}
    if (student, teacher) not in cells:
        raise ConfigError(
            f"student_size={size!r} with teacher={teacher!r} is not a cell of this config's grid (student_sizes "
            f"{config.student_sizes}, teachers {config.teachers or 'all'}); its cells: {', '.join(cells.values())}."
        )


def _run_pending(config: SweepConfig, pending: list[RunSpec], settings_sha: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    source = TeacherSource(config, pending[0].teacher)
    data = source.data()
    bar = tqdm(total=len(pending), desc="capacity-gap sweep", unit="run", disable=not progress)
    for teacher_name in dict.fromkeys(spec.teacher for spec in pending):
        teacher, teacher_params = source.load(teacher_name)
        teacher_eval = evaluate_loss(teacher, data["eval"], config.batch_size)
        cache_path = _teacher_cache(config, teacher, teacher_name, data, source.tokenizer, progress)
        for spec in (spec for spec in pending if spec.teacher == teacher_name):
            bar.set_postfix_str(spec.run_id)
            atomic_write_json(output_dir / RUNNING_FILE, {"run_id": spec.run_id, "pid": os.getpid()})
            record = _run_spec(spec, teacher, cache_path, data, source.tokenizer, config, progress)
            append_record(output_dir, _ledger_record(record, config, teacher_params, teacher_eval, settings_sha))
            (output_dir / RUNNING_FILE).unlink(missing_ok=True)
            bar.update()
        del teacher
    bar.close()


def _teacher_cache(
    config: SweepConfig, teacher: Any, name: str, data: dict[str, Any], tokenizer: Any, progress: bool
) -> Path | None:
    """The cache of ``teacher`` under ``output_dir/caches`` (built or resumed), or None for an online teacher."""
    if config.cache_mode == "online":
        return None
    path = Path(config.output_dir) / "caches" / Path(name).name
    build_cache(teacher, data["train"], path, config, tokenizer, progress)
    return path


def _run_spec(
    spec: RunSpec,
    teacher: Any,
    cache_path: Path | None,
    data: dict[str, Any],
    tokenizer: Any,
    config: SweepConfig,
    progress: bool,
    cache_suffix: str = "",
) -> dict[str, Any]:
    """One cell: direct from ``teacher``, or, for a chained cell, from the last of its assistants (built or
    reused), whose entries the record lists under ``assistants`` (its cache folder ends in ``cache_suffix``)."""
    chain: list[dict[str, Any]] = []
    if spec.assistants:
        teacher, chain = ensure_assistants(config, spec, teacher, data, tokenizer)
        cache_path = _teacher_cache(config, teacher, chain[-1]["path"] + cache_suffix, data, tokenizer, progress)
    _, record = distill_cell(spec.student_params, teacher, cache_path, data, tokenizer, config)
    record = {"run_id": spec.run_id, "student_name": spec.run_id.split("-from-")[0], "teacher": spec.teacher, **record}
    if chain:
        record.update(assistants=chain, assistant_tokens=config.assistant_token_budget)
    return record


def _ledger_record(
    record: dict[str, Any], config: SweepConfig, teacher_params: int, teacher_eval: float, settings_sha: str
) -> dict[str, Any]:
    return {
        **record,
        "family": config.family,
        "teacher_params": teacher_params,
        "teacher_eval_loss": teacher_eval,
        "settings": config.settings(),
        "settings_sha256": settings_sha,
        "format_version": LEDGER_FORMAT_VERSION,
    }
