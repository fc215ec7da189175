"""Embedded corpus, tokenizer training/caching, and tokenize-and-pack."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoTokenizer

from hf_capgap.data import default_tokenizer, load_corpus, tokenize_and_pack, train_tokenizer
from hf_capgap.utils.artifacts import ArtifactError, dataset_fingerprint, tokenizer_fingerprint


@pytest.fixture(scope="module")
def corpus() -> datasets.DatasetDict:
    return load_corpus()


@pytest.fixture(scope="module")
def small_tokenizer(corpus):
    return train_tokenizer(corpus["train"].select(range(300))["text"], vocab_size=400)


def test_corpus_splits_are_deterministic_and_disjoint_by_document(corpus):
    again = load_corpus()
    assert set(corpus) == {"train", "validation"}
    for split in corpus:
        assert corpus[split]._fingerprint == again[split]._fingerprint
        assert corpus[split]["text"] == again[split]["text"]
        assert set(corpus[split].column_names) == {"text", "title", "source"}
    train_docs = set(zip(corpus["train"]["source"], corpus["train"]["title"], strict=True))
    validation_docs = set(zip(corpus["validation"]["source"], corpus["validation"]["title"], strict=True))
    assert validation_docs and not train_docs & validation_docs
    assert {source for source, _ in validation_docs} == {source for source, _ in train_docs}
    assert len(corpus["validation"]) < len(corpus["train"])


def test_corpus_is_natural_text_without_gutenberg_boilerplate(corpus):
    text = "\n".join(corpus["train"]["text"])
    assert len(text) > 5_000_000
    assert "Gutenberg" not in text and "In the beginning God created the heaven" in text
    assert max(len(t) for t in corpus["train"]["text"]) < 20_000


def test_tokenizer_roundtrips_and_reloads_identically(small_tokenizer, tmp_path):
    sample = "O Romeo, Romeo! wherefore art thou Romeo?\nAnd God said, Let there be light: ünïcödé ✓"
    ids = small_tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.decode(ids) == sample
    for token in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(small_tokenizer, token) is not None
    assert len({small_tokenizer.bos_token_id, small_tokenizer.eos_token_id, small_tokenizer.pad_token_id}) == 3
    small_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(sample, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(small_tokenizer)
    assert reloaded.eos_token_id == small_tokenizer.eos_token_id


def test_train_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer([], vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)


def test_default_tokenizer_is_cached_with_manifest(tmp_path):
    first = default_tokenizer(vocab_size=300, cache_dir=tmp_path)
    (cached,) = (tmp_path / "tokenizers").iterdir()
    assert (cached / "capgap_manifest.json").is_file()
    mtime = (cached / "tokenizer.json").stat().st_mtime_ns
    second = default_tokenizer(vocab_size=300, cache_dir=tmp_path)
    assert (cached / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    assert len(second) == 300


def test_pack_rows_have_exact_length_and_eos_between_documents(small_tokenizer):
    texts = ["first document here", "second one", "and a third document that is longer"]
    dataset = datasets.Dataset.from_dict({"text": texts})
    packed = tokenize_and_pack(dataset, small_tokenizer, seq_len=8)
    assert packed.column_names == ["input_ids"]
    rows = packed["input_ids"]
    assert rows and all(len(row) == 8 for row in rows)
    expected = []
    for text in texts:
        expected += small_tokenizer(text, add_special_tokens=False)["input_ids"] + [small_tokenizer.eos_token_id]
    flat = [token for row in rows for token in row]
    assert flat == expected[: len(flat)]
    assert len(expected) - len(flat) < 8
    assert flat.count(small_tokenizer.eos_token_id) >= 2


def test_pack_is_cached_by_fingerprint(corpus, small_tokenizer):
    validation = corpus["validation"].select(range(20))
    first = tokenize_and_pack(validation, small_tokenizer, seq_len=32)
    second = tokenize_and_pack(validation, small_tokenizer, seq_len=32)
    other = tokenize_and_pack(validation, small_tokenizer, seq_len=16)
    assert first._fingerprint == second._fingerprint != other._fingerprint
    assert first.cache_files and first.cache_files == second.cache_files
    packed_dict = tokenize_and_pack(datasets.DatasetDict({"validation": validation}), small_tokenizer, seq_len=32)
    assert packed_dict["validation"]._fingerprint == first._fingerprint


def test_dataset_fingerprint_depends_on_rows_only():
    """Same rows from different sources / slicings / chunkings hash alike; any changed value differs."""
    rows = {"input_ids": [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], "weight": [0.5, 1.0, 1.5, 2.0]}
    direct = datasets.Dataset.from_dict(rows)
    padded = datasets.Dataset.from_dict({key: [*values, *values] for key, values in rows.items()})
    selected = padded.select(range(4))  # an indices mapping over a larger table
    sliced = padded.shuffle(seed=0).sort("weight").select([0, 2, 4, 6])  # same rows via a reordering
    chunked = datasets.concatenate_datasets([direct.select(range(2)), direct.select(range(2, 4))])
    assert len({direct._fingerprint, selected._fingerprint, sliced._fingerprint, chunked._fingerprint}) > 1
    assert dataset_fingerprint(direct) == dataset_fingerprint(selected) == dataset_fingerprint(chunked)
    assert dataset_fingerprint(sliced) == dataset_fingerprint(direct)

    changed = datasets.Dataset.from_dict({**rows, "input_ids": [[1, 2, 3], [4, 5], [6], [7, 8, 9, 11]]})
    reordered = direct.select([1, 0, 2, 3])
    assert dataset_fingerprint(changed) != dataset_fingerprint(direct) != dataset_fingerprint(reordered)
    with pytest.raises(ArtifactError, match="pass a datasets.Dataset"):
        dataset_fingerprint(rows["input_ids"])


def test_pack_rejects_bad_input(small_tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        tokenize_and_pack(datasets.Dataset.from_dict({"text": ["a b c"]}), small_tokenizer, seq_len=1)
    with pytest.raises(ValueError, match="empty"):
        tokenize_and_pack(datasets.Dataset.from_dict({"text": []}), small_tokenizer, seq_len=8)
    with pytest.raises(ValueError, match="neither the text column 'text'"):
        tokenize_and_pack(datasets.Dataset.from_dict({"body": ["x"]}), small_tokenizer, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        tokenize_and_pack(datasets.Dataset.from_dict({"text": ["short"]}), small_tokenizer, seq_len=4096)
