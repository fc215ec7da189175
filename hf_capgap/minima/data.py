"""The rows a MiniMA run trains, calibrates and evaluates on, fixed once so every student sees the same.

Sources: the embedded corpus, local files (json / jsonl / parquet / text; one file, a glob or a
folder) or a Hub dataset. Rows carry text (``dataset_text_field``) or chat ``messages`` (rendered
with the tokenizer's chat template); documents are joined with EOS and cut into rows of exactly
``seq_len`` tokens, as in pretraining, which is what MiniMA distils on.

Small in-memory datasets are identified by a hash of their rows. With ``streaming: true`` the data is
a ``datasets.IterableDataset`` tokenized and packed on the fly (never downloaded or held whole); its
identity is where it comes from (name, config, revision, files, split, seed, token budget), and the
held-out set is the validation split or the first ``eval_rows`` packed rows, which training skips.
Every process reads the same stream and trains on its slice of each global batch, so the held-out rows
stay out on every rank and both students see the same rows; a stream shorter than the token budget is
read again from its start (with a warning naming its size), and the stages report the distinct tokens.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

from hf_capgap.errors import ConfigError
from hf_capgap.minima.config import EMBEDDED_DATASET, MinimaConfig
from hf_capgap.minima.plan import Plan, steps_for

logger = logging.get_logger(__name__)

EMBEDDED_DATASET_NAME = "hf_capgap embedded Shakespeare + KJV corpus"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
SHUFFLE_BUFFER_ROWS = 1024
PACKED_COLUMN = "input_ids"


@dataclass
class StreamPasses:
    """How often training read a stream from its start, learnt while reading it (a stream has no length)."""

    rows: int  # rows the token budget trains on
    seq_len: int
    rows_per_pass: int | None = None  # None: the budget fitted in one pass (as far as read)

    def ran_out(self, rows_per_pass: int) -> None:
        """Record that the stream holds ``rows_per_pass`` rows, warning (once) that training reads it again."""
        if self.rows_per_pass is not None:
            return
        self.rows_per_pass = rows_per_pass
        tokens = rows_per_pass * self.seq_len
        logger.warning(
            f"the training stream ran out after {rows_per_pass} rows ({tokens:,} tokens) of the {self.rows} the token "
            f"budget needs: training reads it again. Lower train_tokens to at most {tokens:,} or add data to train "
            "on distinct rows."
        )

    def distinct_rows(self, rows: int) -> int:
        """Distinct rows among the first ``rows`` rows trained on."""
        return rows if self.rows_per_pass is None else min(rows, self.rows_per_pass)


@dataclass
class RunData:
    """The tokenized data every stage shares."""

    tokenizer: Any
    train: Any  # datasets.Dataset of exactly the rows trained on, or an IterableDataset when streaming
    eval: Any  # datasets.Dataset of held-out packed rows (small, materialised)
    calibration: list[dict[str, Any]]
    identity: dict[str, Any]  # what the run trained on, for stage and cache names
    passes: StreamPasses | None = None  # how a stream covered the token budget (None in memory)


def is_local_dataset(name: str) -> bool:
    """A path, glob or data file on this machine (anything else names a Hub dataset)."""
    return (
        Path(name).exists()
        or any(char in name for char in "*?[")
        or name.startswith((".", "/", "~"))
        or Path(name).suffix in FILE_BUILDERS
    )


def local_data_files(name: str) -> tuple[str, list[str]]:
    """(datasets builder, sorted files) of a local file, glob or folder; one file type per dataset."""
    path = Path(name)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in FILE_BUILDERS and p.is_file())
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(glob.glob(name, recursive=True))
    if not files:
        raise FileNotFoundError(
            f"dataset={name!r} matches no {'/'.join(FILE_BUILDERS)} files; "
            "point it at a file, a glob or a folder of them."
        )
    builders = {FILE_BUILDERS.get(Path(file).suffix) for file in files}
    if None in builders or len(builders) != 1:
        raise ConfigError(
            f"dataset={name!r} mixes or holds unsupported file types {sorted({Path(f).suffix for f in files})}; "
            f"use one of {', '.join(FILE_BUILDERS)} per dataset."
        )
    return builders.pop(), files


def prepare_data(config: MinimaConfig, plan: Plan, tokenizer: Any) -> RunData:
    """Pack the data with the teacher's tokenizer; pick the training, held-out and calibration rows."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            "the teacher's tokenizer has no eos_token; documents are joined with it. Set one and save it."
        )
    train_source, eval_source = load_sources(config)
    rows = steps_for(config, plan) * config.batch_size * config.gradient_accumulation_steps * plan.processes
    pack = _packer(config, plan.seq_len, tokenizer)
    packed_train = pack(train_source)
    if config.streaming:
        stream = _one_stream(packed_train)
        if eval_source is None:
            evaluation = _materialise(stream.take(config.eval_rows))
            stream = stream.skip(config.eval_rows)
        else:
            evaluation = _materialise(pack(eval_source).take(config.eval_rows))
        passes = StreamPasses(rows, plan.seq_len)
        train = _one_stream(stream.shuffle(seed=config.seed, buffer_size=SHUFFLE_BUFFER_ROWS), rows, passes)
        calibration_rows = _materialise(train.take(config.calibration_batches * config.batch_size))
        if len(calibration_rows) == 0:
            raise ConfigError(
                f"the training stream holds no training row of {plan.seq_len} tokens after the eval_rows="
                f"{config.eval_rows} held-out rows; lower eval_rows or seq_len, set eval_split, or add data."
            )
        identity = _source_identity(config, plan, tokenizer)
    else:
        if eval_source is None:
            held_out = min(config.eval_rows, len(packed_train) // 2)
            evaluation = packed_train.select(range(held_out))
            packed_train = packed_train.select(range(held_out, len(packed_train)))
        else:
            packed_eval = pack(eval_source)
            evaluation = packed_eval.select(range(min(config.eval_rows, len(packed_eval))))
        if rows > len(packed_train):
            raise ConfigError(
                f"train_tokens={config.train_tokens} needs {rows} rows of {plan.seq_len} tokens but the training data "
                f"packs into {len(packed_train)}; lower train_tokens (or stream a larger dataset)."
            )
        train = packed_train.shuffle(seed=config.seed).select(range(rows)).flatten_indices()
        calibration_rows = train.select(range(min(rows, config.calibration_batches * config.batch_size)))
        identity = {"rows_sha": _content_fingerprint(train)}
        passes = None
    if len(evaluation) == 0:
        raise ConfigError(f"the held-out data packs into no row of {plan.seq_len} tokens; lower seq_len or add text.")
    return RunData(
        tokenizer, train, evaluation, _calibration_batches(calibration_rows, config.batch_size), identity, passes
    )


def load_sources(config: MinimaConfig) -> tuple[Any, Any | None]:
    """(training split, held-out split or None when the held-out rows come off the training split)."""
    import datasets

    if config.dataset == EMBEDDED_DATASET:
        from hf_capgap.data import load_corpus

        corpus = load_corpus()
        train, held_out = corpus["train"], corpus["validation"] if config.eval_split else None
        if config.streaming:
            return train.to_iterable_dataset(), None if held_out is None else held_out.to_iterable_dataset()
        return train, held_out
    if is_local_dataset(config.dataset):
        builder, files = local_data_files(config.dataset)
        train = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=config.streaming)
        return train, None
    common = {"name": config.dataset_config, "revision": config.dataset_revision, "streaming": config.streaming}
    train = datasets.load_dataset(config.dataset, split=config.dataset_split, **common)
    held_out = None
    if config.eval_split is not None:
        try:
            held_out = datasets.load_dataset(config.dataset, split=config.eval_split, **common)
        except ValueError:  # no such split: hold the first rows of the training split out instead
            held_out = None
    return train, held_out


def _packer(config: MinimaConfig, seq_len: int, tokenizer: Any) -> Any:
    """A function packing one split (text or chat ``messages``) into full rows of ``seq_len`` tokens."""
    from hf_capgap.data import tokenize_and_pack

    return lambda source: tokenize_and_pack(source, tokenizer, seq_len, text_field=config.dataset_text_field)


def _one_stream(stream: Any, rows: int | None = None, passes: StreamPasses | None = None) -> Any:
    """``stream`` as a one-shard IterableDataset; with ``rows``, exactly that many, reading it again as needed.

    With one shard, accelerate gives every rank the same stream and each takes its slice of every global
    batch (as the dispatcher of a plain Trainer does); with one shard per file it would hand each rank its
    own files, where ``skip`` skips ``eval_rows / W`` rows per rank instead of the held-out rows, and a rank
    with little data stops early while the others wait for it in a collective.
    """
    import datasets

    features = datasets.Features({PACKED_COLUMN: datasets.List(datasets.Value("int32"))})
    if rows is None:
        return datasets.IterableDataset.from_generator(_rows_of, features=features, gen_kwargs={"stream": stream})
    return datasets.IterableDataset.from_generator(
        _passes_over, features=features, gen_kwargs={"stream": stream, "rows": rows, "passes": passes}
    )


def _rows_of(stream: Any) -> Iterator[dict[str, Any]]:
    yield from stream


def _passes_over(stream: Any, rows: int, passes: StreamPasses) -> Iterator[dict[str, Any]]:
    """The first ``rows`` rows of ``stream`` read again and again, each pass shuffled by its own seed.

    The Trainer sees one epoch of exactly ``rows`` rows, so a resume skips to the very row it stopped
    at in any pass (no partial batches, no pass restarting from its beginning).
    """
    produced = 0
    for index in itertools.count():
        stream.set_epoch(index)
        in_pass = 0
        for row in stream:
            if produced == rows:
                return
            yield row
            in_pass, produced = in_pass + 1, produced + 1
        if in_pass == 0 or produced == rows:
            return
        passes.ran_out(in_pass)


def _materialise(rows: Any) -> Any:
    import datasets

    return datasets.Dataset.from_list([{PACKED_COLUMN: row[PACKED_COLUMN]} for row in rows])


def _calibration_batches(rows: Any, batch_size: int) -> list[dict[str, Any]]:
    import torch

    ids = torch.tensor(rows[PACKED_COLUMN], dtype=torch.long)
    return [{"input_ids": batch} for batch in ids.split(batch_size)]


def _content_fingerprint(dataset: Any) -> str:
    from hf_capgap.utils.artifacts import dataset_fingerprint

    return dataset_fingerprint(dataset)


def _source_identity(config: MinimaConfig, plan: Plan, tokenizer: Any) -> dict[str, Any]:
    """What a streamed run trains on, without reading it: source, split, seed and budget."""
    from hf_capgap.utils.artifacts import tokenizer_fingerprint

    files = None
    if is_local_dataset(config.dataset):
        files = [(Path(file).name, Path(file).stat().st_size) for file in local_data_files(config.dataset)[1]]
    return {
        "dataset": config.dataset if files is None else "local files",
        "data_files": files,
        "config": config.dataset_config,
        "revision": config.dataset_revision,
        "split": config.dataset_split,
        "eval_split": config.eval_split,
        "eval_rows": config.eval_rows,
        "text_field": config.dataset_text_field,
        "seed": config.seed,
        "train_tokens": config.train_token_count,
        "seq_len": plan.seq_len,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def on_policy_rows(rows: Any, config: MinimaConfig) -> Any:
    """The packed training ``rows`` as on-policy rows (same rows, same order): each row's first ``prompt_tokens``
    as its prompt, alone at lmbda = 1 (every completion is generated), else with the row's next
    ``max_completion_length`` tokens as completion; pre-tokenized, with a ``completion_mask`` marking the prompt."""
    from hf_capgap.data import prompt_completion_rows

    return prompt_completion_rows(rows, config.prompt_tokens, config.dataset_completion_length)


def scratch_rows(rows: Any, config: MinimaConfig) -> Any:
    """The from-scratch baseline's rows: the packed training ``rows``, or when the run generates each row's first
    prompt_tokens + max_completion_length tokens, the distilled student's token count per row (same rows, order)."""
    if not config.generates:
        return rows
    tokens = config.prompt_tokens + config.max_completion_length
    return rows.map(lambda row: {PACKED_COLUMN: row[PACKED_COLUMN][:tokens]}, remove_columns=rows.column_names)
