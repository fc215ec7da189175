"""Building a teacher cache: validate, prepare the rows, run the teacher shard by shard, manifest last.

A build is resumable and can be spread over processes. Shard j always covers the same rows, is
written under a temporary name and renamed only once complete, so a rerun keeps finished shards and
redoes the rest. Under accelerate / torch.distributed with world size W, rank r builds the shards
with j % W == r and rank 0 writes the manifest after a barrier: the files equal a one-process build.
A teacher sharded across the ranks (FSDP, DeepSpeed ZeRO-3) runs each forward as a collective, so
there the ranks agree first on the most batches any of them has, and the others run spare forwards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from hf_capgap.cache.batching import (
    FittingBatchSize,
    batch_count,
    evaluating,
    join_other_ranks_forwards,
    runs_in_lockstep,
)
from hf_capgap.cache.budget import check_budget, draws_agreed_over_ranks
from hf_capgap.cache.directory import (
    claim_directory,
    inspect_directory,
    record_preparation,
    shard_is_complete,
    write_final_manifest,
)
from hf_capgap.cache.encode import encode_batch
from hf_capgap.cache.format import (
    DTYPES,
    MAX_DRAWS,
    MODES,
    ROW_COLUMNS,
    SAMPLERS,
    ShardPlan,
    id_dtype,
    row_dicts,
    shard_name,
    shard_schema,
)
from hf_capgap.data import has_labelled_position, make_collator, prepare_and_record, uses_padding_free
from hf_capgap.errors import ConfigError
from hf_capgap.models import check_logits_cover, vocabulary_fingerprint
from hf_capgap.utils.artifacts import dataset_fingerprint, model_fingerprint
from hf_capgap.utils.processes import ProcessGroup

Collator = Callable[[list[dict[str, Any]]], Any]


def build_cache(
    teacher: Any,
    dataset: Any,
    path: Path,
    *,
    tokenizer: Any = None,
    args: Any = None,
    mode: str = "topk",
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_tokens: int = 262144,
    dtype: str = "float16",
    seed: int = 0,
    sampler: str = "systematic",
    bytes_per_token: float | None = None,
    formatting_func: Callable[[dict], str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> None:
    """Write (or finish) the cache at ``path``; every input is checked before the teacher runs."""
    _check_options(mode, k, temperature, batch_size, shard_tokens, dtype, sampler)
    check_budget(bytes_per_token, mode)
    args = args if args is not None else default_preparation_args()
    rows, collator, spec = _prepare_build(
        teacher,
        dataset,
        tokenizer,
        args,
        formatting_func,
        mode=mode,
        k=k,
        temperature=temperature,
        dtype=dtype,
        seed=seed,
        sampler=sampler,
        shard_tokens=shard_tokens,
    )
    group = ProcessGroup.current()
    lockstep = runs_in_lockstep(teacher, group.num_processes)
    fitting = FittingBatchSize(batch_size, halve=not lockstep)
    if bytes_per_token is not None:
        draws = draws_agreed_over_ranks(teacher, rows, collator, spec, bytes_per_token, fitting, group)
        spec.update(k=draws, draws=draws)
    if _reuse_or_claim(path, spec, group, overwrite=overwrite):
        return
    plan = ShardPlan(spec["num_sequences"], spec["rows_per_shard"])
    _build_own_shards(teacher, rows, collator, path, spec, plan, fitting, group, lockstep=lockstep, progress=progress)
    group.wait_for_everyone()
    if group.is_main_process:
        teacher_name = getattr(teacher, "name_or_path", "") or teacher.config.name_or_path
        write_final_manifest(path, spec, plan, teacher_name)
    group.wait_for_everyone()


def _prepare_build(
    teacher: Any,
    dataset: Any,
    tokenizer: Any,
    args: Any,
    formatting_func: Callable[[dict], str] | None,
    *,
    mode: str,
    k: int,
    temperature: float,
    dtype: str,
    seed: int,
    sampler: str,
    shard_tokens: int,
) -> tuple[Any, Collator, dict[str, Any]]:
    """The rows the trainer trains on, their collator, and the spec: every setting the cache depends on,
    what a rerun must match to reuse or resume it."""
    prepared, preparation = prepare_rows(dataset, tokenizer, args, formatting_func)
    rows = prepared.select_columns([c for c in ROW_COLUMNS if c in prepared.column_names])
    real_vocab = _real_vocab_size(teacher, tokenizer)
    num_tokens = _check_rows(rows, real_vocab)
    collator = make_collator(tokenizer, args)
    if mode == "topk" and k > real_vocab:
        raise ConfigError(
            f"k={k} exceeds the real vocabulary ({real_vocab} tokens); use k <= {real_vocab} or mode='dense'."
        )
    spec = {
        "mode": mode,
        "k": real_vocab if mode == "dense" else k,
        "draws": k if mode == "sampled" else None,
        "sampler": sampler if mode == "sampled" else None,
        "temperature": float(temperature),
        "dtype": dtype,
        "seed": seed,
        "real_vocab_size": real_vocab,
        "id_dtype": id_dtype(real_vocab),
        "padding_free": uses_padding_free(args),
        "preparation": preparation,
        "has_seq_lengths": "seq_lengths" in rows.column_names,
        "num_sequences": len(rows),
        "num_tokens": num_tokens,
        "rows_per_shard": max(1, shard_tokens * len(rows) // num_tokens),
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "teacher_fingerprint": model_fingerprint(teacher),
        "vocabulary_fingerprint": None if tokenizer is None else vocabulary_fingerprint(tokenizer),
        "dataset_fingerprint": dataset_fingerprint(prepared),
    }
    return rows, collator, spec


def _reuse_or_claim(path: Path, spec: dict[str, Any], group: ProcessGroup, *, overwrite: bool) -> bool:
    """True when ``path`` already holds this cache complete (reused as is); otherwise the main process
    clears what it must and records the spec, and the build goes on."""
    found = inspect_directory(path, spec, overwrite=overwrite)
    if found == "complete":
        if group.is_main_process:
            record_preparation(path, spec)
        group.wait_for_everyone()
        return True
    group.wait_for_everyone()
    if group.is_main_process:
        claim_directory(path, stale=found == "stale", spec=spec)
    group.wait_for_everyone()
    return False


def _build_own_shards(
    teacher: Any,
    rows: Any,
    collator: Collator,
    path: Path,
    spec: dict[str, Any],
    plan: ShardPlan,
    fitting: FittingBatchSize,
    group: ProcessGroup,
    *,
    lockstep: bool,
    progress: bool,
) -> None:
    """Build the unfinished shards j with j % W == rank; in lockstep, then the spare forwards the busier
    ranks' collectives need (counted before any forward, which the others' count exchange would block)."""
    own = [j for j in range(plan.num_shards) if j % group.num_processes == group.process_index]
    todo = [j for j in own if not shard_is_complete(path / shard_name(j), plan, j)]
    spare = 0
    if lockstep:
        own_batches = batch_count(plan, todo, fitting.rows)
        spare = group.most_over_ranks(own_batches, next(teacher.parameters()).device) - own_batches
    _build_shards(teacher, rows, collator, path, spec, plan, todo, fitting, progress and group.is_main_process)
    join_other_ranks_forwards(teacher, rows, collator, spare)


def default_preparation_args() -> Any:
    """The data settings a default ``DistillationConfig`` prepares and collates rows with, for a build
    given no ``args``: TRL's SFTConfig defaults, with the two defaults DistillationConfig changes (bf16
    and gradient checkpointing, which do not shape rows) set as it sets them on a CPU. Built here from
    ``trl.SFTConfig`` so the cache does not import the trainer stage above it."""
    from trl import SFTConfig

    return SFTConfig(report_to=[], bf16=False, gradient_checkpointing=None)


def prepare_rows(
    dataset: Any, tokenizer: Any, args: Any, formatting_func: Callable[[dict], str] | None = None
) -> tuple[Any, dict[str, Any]]:
    """The rows the trainer trains on with ``args`` and ``formatting_func`` (TRL's SFT preparation, as in
    the trainer), and the record of what they depend on (:func:`hf_capgap.data.sft.prepare_and_record`)."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset must be a map-style datasets.Dataset (text, messages, prompt-completion or input_ids), "
            f"got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ConfigError("dataset is empty: there is nothing to cache; check how it was loaded or filtered.")
    prepared, record = prepare_and_record(dataset, tokenizer, args, formatting_func=formatting_func)
    if len(prepared) == 0:
        raise ConfigError("no row of the dataset has a token in the loss after preparation; check its masks.")
    return prepared, record


def _real_vocab_size(teacher: Any, tokenizer: Any) -> int:
    """The tokenizer's vocabulary (the online trainer's target), checked against the teacher's logits."""
    if tokenizer is None:
        return int(teacher.config.vocab_size)
    return check_logits_cover(teacher, tokenizer, "the teacher")


def _check_options(
    mode: str, k: int, temperature: float, batch_size: int, shard_tokens: int, dtype: str, sampler: str
) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a cache mode; use one of {', '.join(MODES)}.")
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r} is not a sampler; use one of {', '.join(SAMPLERS)}.")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be a positive int (entries kept, or draws, per position).")
    if mode == "sampled" and k > MAX_DRAWS:
        raise ConfigError(f"k={k} draws: a sampled cache stores counts as uint8, so use k <= {MAX_DRAWS}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature={temperature!r} must be a finite number > 0.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int.")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ConfigError(f"shard_tokens={shard_tokens!r} must be a positive int.")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not a storage dtype; use one of {', '.join(DTYPES)}.")


def _check_rows(rows: Any, real_vocab: int) -> int:
    """Total tokens of the prepared rows; raise if an id is outside the real vocabulary."""
    import pyarrow.compute as pc

    ids = pc.list_flatten(rows.with_format("arrow")[:]["input_ids"])
    low, high = pc.min(ids).as_py(), pc.max(ids).as_py()
    if low < 0:
        raise ConfigError("dataset 'input_ids' holds negative ids; token ids must be >= 0.")
    if high >= real_vocab:
        raise ConfigError(
            f"dataset holds token id {high} but the real vocabulary has {real_vocab} tokens; the dataset was "
            "tokenized for another model."
        )
    if not has_labelled_position(rows):
        raise ConfigError("no row has a labelled token after its first one: there is nothing to cache.")
    return len(ids)


def _build_shards(
    teacher: Any,
    rows: Any,
    collator: Collator,
    path: Path,
    spec: dict[str, Any],
    plan: ShardPlan,
    todo: list[int],
    fitting: FittingBatchSize,
    progress: bool,
) -> None:
    """Write the shards ``todo``, each under a temporary name renamed once complete and synced."""
    import torch
    from tqdm.auto import tqdm

    schema = shard_schema(spec)

    def encode_rows(low: int, high: int) -> pa.RecordBatch:
        batch_rows = row_dicts(rows.with_format("arrow")[low:high])
        return encode_batch(teacher, batch_rows, collator(batch_rows), low, spec, schema)

    bar = tqdm(
        total=sum(plan.rows(j)[1] - plan.rows(j)[0] for j in todo),
        desc="teacher cache",
        unit="seq",
        disable=not progress,
    )
    try:
        with torch.inference_mode(), evaluating(teacher):
            for j in todo:
                start, end = plan.rows(j)
                final = path / shard_name(j)
                tmp = path / f".{final.name}.tmp"
                with open(tmp, "wb") as handle, pa.ipc.new_stream(handle, schema) as writer:
                    for low, high, record in fitting.batches(start, end, encode_rows):
                        writer.write_batch(record)
                        bar.update(high - low)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, final)
    finally:
        bar.close()
