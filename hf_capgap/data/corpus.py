"""Embedded corpus, tokenizer training, and tokenize-and-pack with ``datasets``.

Everything here runs offline from a fresh install: the corpus ships inside the package
(``hf_capgap/data/embedded/``), tokenizers are trained locally in seconds, and every step is cached by
fingerprint so that repeated runs of a sweep reuse the work.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hf_capgap.errors import ConfigError
from hf_capgap.utils.artifacts import (
    ArtifactError,
    atomic_directory,
    file_sha256,
    json_sha256,
    read_manifest,
    tokenizer_fingerprint,
    write_manifest,
)

CORPUS_FILE = Path(__file__).parent / "embedded" / "documents.jsonl.xz"
VALIDATION_FRACTION = 0.06
PASSAGE_CHARS = 1500
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TOKENIZER_KIND = "tokenizer"
TOKENIZER_FORMAT_VERSION = 1
_CORPUS_FORMAT_VERSION = 1
_PACK_FORMAT_VERSION = 2
_BYTE_ALPHABET_SIZE = 256

DatasetOrDict = TypeVar("DatasetOrDict", datasets.Dataset, datasets.DatasetDict)


def load_corpus(cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """The embedded Shakespeare + King James Bible corpus as ``train`` / ``validation`` splits.

    Validation holds out whole documents (about 6% of the plays and of the books, chosen by a hash of
    their titles), so no scene or chapter of a validation document is ever trained on. Documents are
    then cut into passages of roughly ``PASSAGE_CHARS`` characters at paragraph boundaries. Columns:
    ``text``, ``title``, ``source``. Fingerprints are stable across calls, so downstream ``map`` caches hit.
    """
    documents = datasets.load_dataset(
        "json", data_files={"documents": str(CORPUS_FILE)}, split="documents", cache_dir=cache_dir
    )
    validation_rows = _validation_rows(documents["source"], documents["title"])
    splits = {
        "train": [i for i in range(len(documents)) if i not in validation_rows],
        "validation": sorted(validation_rows),
    }
    corpus = datasets.DatasetDict()
    for name, rows in splits.items():
        subset = documents.select(rows)
        corpus[name] = subset.map(
            _split_into_passages,
            batched=True,
            fn_kwargs={"max_chars": PASSAGE_CHARS},
            new_fingerprint=_derived_fingerprint(subset, "passages", _CORPUS_FORMAT_VERSION, PASSAGE_CHARS),
            desc=f"Cutting {name} documents into passages",
        )
    return corpus


def _validation_rows(sources: list[str], titles: list[str]) -> set[int]:
    """Per source, the documents whose title hash sorts first (at least one per source)."""
    by_source: dict[str, list[tuple[str, int]]] = {}
    for row, (source, title) in enumerate(zip(sources, titles, strict=True)):
        key = hashlib.sha256(f"{source}/{title}".encode()).hexdigest()
        by_source.setdefault(source, []).append((key, row))
    held_out: set[int] = set()
    for rows in by_source.values():
        count = max(1, round(len(rows) * VALIDATION_FRACTION))
        held_out.update(row for _, row in sorted(rows)[:count])
    return held_out


def _split_into_passages(batch: dict[str, list], max_chars: int) -> dict[str, list]:
    passages: dict[str, list] = {"text": [], "title": [], "source": []}
    for text, title, source in zip(batch["text"], batch["title"], batch["source"], strict=True):
        current: list[str] = []
        size = 0
        for paragraph in text.split("\n\n"):
            current.append(paragraph)
            size += len(paragraph)
            if size >= max_chars:
                passages["text"].append("\n\n".join(current))
                current, size = [], 0
        if current:
            passages["text"].append("\n\n".join(current))
        added = len(passages["text"]) - len(passages["title"])
        passages["title"].extend([title] * added)
        passages["source"].extend([source] * added)
    return passages


def _derived_fingerprint(dataset: datasets.Dataset, *parts: Any) -> str:
    return json_sha256([dataset._fingerprint, *parts])[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style: any string round-trips) with bos/eos/pad/unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}.")
    iterator: Iterator[str] = iter(texts)
    first = next(iterator, None)
    if first is None:
        raise ConfigError("texts is empty: train_tokenizer needs at least one non-empty text.")
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(chain([first], iterator), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def default_tokenizer(vocab_size: int = 8192, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer trained on the embedded train split, built once and then loaded from disk.

    Cached under ``cache_dir``, else ``$HF_CAPGAP_CACHE``, else ``~/.cache/hf_capgap``, keyed by the
    corpus file hash and ``vocab_size``; a cached copy whose manifest does not match is rebuilt.
    """
    settings = {
        "vocab_size": vocab_size,
        "corpus_sha256": file_sha256(CORPUS_FILE),
        "passage_chars": PASSAGE_CHARS,
        "validation_fraction": VALIDATION_FRACTION,
    }
    directory = _cache_root(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{json_sha256(settings)[:12]}"
    if directory.exists():
        try:
            manifest = read_manifest(
                directory, TOKENIZER_KIND, TOKENIZER_FORMAT_VERSION, expected=settings, verify_files=True
            )
            tokenizer = AutoTokenizer.from_pretrained(directory)
            if tokenizer_fingerprint(tokenizer) == manifest["tokenizer_fingerprint"]:
                return tokenizer
        except ArtifactError:
            pass
    tokenizer = train_tokenizer(load_corpus()["train"]["text"], vocab_size=vocab_size)
    with atomic_directory(directory, overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
        write_manifest(
            tmp,
            TOKENIZER_KIND,
            TOKENIZER_FORMAT_VERSION,
            {**settings, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
        )
    return tokenizer


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("HF_CAPGAP_CACHE", Path.home() / ".cache" / "hf_capgap"))


def tokenize_and_pack(
    dataset: DatasetOrDict | datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    text_field: str = "text",
    num_proc: int | None = None,
) -> DatasetOrDict | datasets.IterableDataset:
    """Tokenize documents and pack them into rows of exactly ``seq_len`` token ids (pretraining rows).

    Documents are the ``text_field`` column, or chat ``messages`` rendered by TRL with the tokenizer's
    chat template. Each ends with the eos token so the model sees where one ends and the next begins;
    TRL's ``pack_dataset`` ("wrapped") cuts the token stream of each ``map`` batch into rows, and the
    short row left at the end of each batch is dropped, so every row is full. The only column is
    ``input_ids`` (int32); trainers derive labels from it. A ``datasets.IterableDataset`` is packed on
    the fly as it streams. User datasets for SFT-style distillation (completion or assistant masks,
    document-aware packing) go through :func:`hf_capgap.data.sft.prepare_dataset` instead. In memory,
    every step is cached by the dataset and tokenizer fingerprints.
    """
    from trl import pack_dataset

    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} is too small: a language-model row needs at least 2 tokens.")
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer has no eos_token: set tokenizer.eos_token so documents can be separated.")
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict(
            {
                name: tokenize_and_pack(split, tokenizer, seq_len, text_field=text_field, num_proc=num_proc)
                for name, split in dataset.items()
            }
        )
    streamed = isinstance(dataset, datasets.IterableDataset)
    columns = list(next(iter(dataset), {})) if streamed else dataset.column_names
    if not columns:
        raise ConfigError("dataset is empty: tokenize_and_pack needs at least one text row.")
    chat_template = _document_source(columns, text_field, tokenizer)
    if not streamed and len(dataset) == 0:
        raise ConfigError("dataset is empty: tokenize_and_pack needs at least one text row.")
    fingerprint = (
        _derived_fingerprint(
            dataset, "pack", _PACK_FORMAT_VERSION, tokenizer_fingerprint(tokenizer), seq_len, text_field, chat_template
        )
        if not streamed
        else None
    )

    def cached(name: str, description: str) -> dict[str, Any]:
        """map/filter options that only in-memory datasets take."""
        return (
            {} if streamed else {"num_proc": num_proc, "new_fingerprint": f"{fingerprint}-{name}", "desc": description}
        )

    if chat_template is not None:
        from trl.data_utils import maybe_apply_chat_template

        dataset = dataset.map(
            maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer}, **cached("chat", "Rendering chats")
        )
        text_field = "text"
        columns = list(dict.fromkeys([*columns, text_field]))  # the rendered text joins the columns
    tokenized = dataset.map(
        _tokenize_documents,
        batched=True,
        remove_columns=columns,  # known without reading a streamed dataset's first row again
        fn_kwargs={"tokenizer": tokenizer, "text_field": text_field},
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        **cached("tokens", "Tokenizing documents"),
    )
    packed = pack_dataset(tokenized, seq_len, strategy="wrapped", map_kwargs=cached("wrapped", "Packing"))
    if streamed:
        # Row by row: a batched filter on a stream joins the keys of every batch before it into one string.
        return packed.filter(lambda ids: len(ids) == seq_len, input_columns="input_ids")
    full = packed.filter(
        _full_rows,
        batched=True,
        input_columns="input_ids",
        fn_kwargs={"seq_len": seq_len},
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        desc=f"Keeping full rows of {seq_len}",
    )
    if len(full) == 0:
        raise ConfigError(
            f"seq_len={seq_len} is longer than the tokens available per batch: no full row could be "
            "packed. Use a smaller seq_len or more text."
        )
    return full


def _document_source(columns: list[str], text_field: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Where documents come from: None for the ``text_field`` column, or the chat template that renders
    ``messages``; raises naming the columns and the fix when neither is usable."""
    if text_field in columns:
        return None
    if "messages" not in columns:
        raise ConfigError(
            f"dataset has columns {columns}, neither the text column {text_field!r} nor chat 'messages'; set "
            "dataset_text_field to the column holding the text."
        )
    from hf_capgap.data.formats import require_chat_template

    template = require_chat_template(tokenizer)
    return template if isinstance(template, str) else json_sha256(template)


def _tokenize_documents(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, text_field: str
) -> dict[str, list]:
    texts = [text for text in batch[text_field] if text]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in encoded]}


def _full_rows(rows: list[list[int]], seq_len: int) -> list[bool]:
    return [len(row) == seq_len for row in rows]
