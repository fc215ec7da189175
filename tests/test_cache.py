"""TeacherCache: cached signals equal the teacher's own log-probs, and bad or stale caches are refused."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import numpy as np
import pytest
import torch
from cache_build_script import SEQ_LEN, VOCAB_SIZE, make_dataset, make_teacher

from hf_capgap.artifacts import ArtifactError, tokenizer_fingerprint
from hf_capgap.cache import (
    CACHE_COLUMNS,
    LOGPROB_FLOOR,
    TEACHER_BATCH_KEYS,
    TeacherCache,
)

SCRIPT = Path(__file__).with_name("cache_build_script.py")
REPO = SCRIPT.parent.parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared CPU run fastest, and bit-identically to the helper script, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    return make_teacher()


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(rows=12, labels=True)


def reference_logprobs(teacher, dataset, temperature=1.0):
    ids = torch.tensor(dataset["input_ids"])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def full_batch(cache):
    return cache.collate(list(cache.dataset.with_format("numpy")))


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    return calls, handle


def shard_files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("shard-*.arrow"))}


def test_topk_matches_teacher_and_tail_closes_the_distribution(teacher, dataset, tmp_path):
    cache = TeacherCache.build(
        teacher,
        dataset,
        tmp_path / "c",
        mode="topk",
        k=8,
        batch_size=5,
        shard_tokens=4 * SEQ_LEN,
        progress=False,
    )
    batch = full_batch(cache)
    expected = reference_logprobs(teacher, dataset)
    top_values, top_ids = expected.topk(8, dim=-1)

    assert len(cache) == len(dataset) == len(cache.dataset)
    assert len(cache.manifest["shards"]) == 3
    assert torch.equal(batch["teacher_topk_ids"], top_ids)
    torch.testing.assert_close(batch["teacher_topk_logprobs"], top_values, atol=1e-2, rtol=1e-3)
    mass = torch.logsumexp(
        torch.cat([batch["teacher_topk_logprobs"], batch["teacher_tail_logprob"][..., None]], -1), -1
    )
    torch.testing.assert_close(mass, torch.zeros_like(mass), atol=2e-3, rtol=0)
    assert torch.equal(batch["labels"], torch.tensor(dataset["labels"]))
    assert torch.equal(batch["input_ids"], torch.tensor(dataset["input_ids"]))
    shapes = {key: (tuple(value.shape), value.dtype) for key, value in batch.items()}
    b, length = len(dataset), SEQ_LEN
    assert shapes == {
        "input_ids": ((b, length), torch.long),
        "attention_mask": ((b, length), torch.long),
        "labels": ((b, length), torch.long),
        "teacher_topk_ids": ((b, length - 1, 8), torch.long),
        "teacher_topk_logprobs": ((b, length - 1, 8), torch.float32),
        "teacher_tail_logprob": ((b, length - 1), torch.float32),
    }
    assert set(TEACHER_BATCH_KEYS["topk"]) <= set(batch)
    assert set(cache.dataset.column_names) <= set(CACHE_COLUMNS)
    # uint16 ids + fp16 values per slot, float32 tail per position.
    assert cache.bytes_per_token == 8 * (2 + 2) + 4


def test_topk_with_k_equal_vocab_stores_floor_tail(teacher, tmp_path):
    dataset = make_dataset(rows=2)
    cache = TeacherCache.build(teacher, dataset, tmp_path / "c", mode="topk", k=VOCAB_SIZE, progress=False)
    tail = full_batch(cache)["teacher_tail_logprob"]
    assert torch.all(tail == LOGPROB_FLOOR)


def peaked_teacher(vocab_size):
    """A random teacher whose next-token distributions are far from uniform."""
    model = make_teacher(vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def test_sampled_counts_and_frequencies_follow_teacher(tmp_path):
    vocab, k, temperature, repeats = 64, 64, 0.5, 128
    teacher = peaked_teacher(vocab)
    # One short row repeated: every copy draws independently (own seed), so each position gets repeats*k draws.
    dataset = make_dataset(rows=1, seq_len=5, vocab_size=vocab).select([0] * repeats).flatten_indices()
    cache = TeacherCache.build(
        teacher, dataset, tmp_path / "a", mode="sampled", k=k, temperature=temperature, progress=False
    )
    batch = full_batch(cache)
    ids, counts, logprobs = (
        batch["teacher_sample_ids"],
        batch["teacher_sample_counts"],
        batch["teacher_sample_logprobs"],
    )
    expected = reference_logprobs(teacher, dataset, temperature)

    assert torch.all(counts.sum(-1) == k)
    used = counts > 0
    assert torch.all(ids[..., 1:][used[..., 1:]] > ids[..., :-1][used[..., 1:]]), "unique ids, ascending"
    assert torch.all(ids[~used] == 0) and torch.all(logprobs[~used] == 0)
    torch.testing.assert_close(logprobs[used], expected.gather(-1, ids)[used], atol=1e-2, rtol=1e-3)
    frequencies = torch.zeros_like(expected).scatter_add_(-1, ids, counts).sum(0) / (repeats * k)
    probs = expected[0].exp()
    assert (frequencies - probs).abs().max() < 0.04
    assert (probs - probs.roll(1, dims=0)).abs().max() > 0.1, "positions differ, so the check above has teeth"

    rebuilt = TeacherCache.build(
        teacher,
        dataset,
        tmp_path / "b",
        mode="sampled",
        k=k,
        temperature=temperature,
        batch_size=3,
        progress=False,
    )
    again = full_batch(rebuilt)
    assert torch.equal(again["teacher_sample_ids"], ids) and torch.equal(
        again["teacher_sample_counts"], counts
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dense_roundtrips_storage_dtype(teacher, dataset, tmp_path, dtype):
    cache = TeacherCache.build(teacher, dataset, tmp_path / "c", mode="dense", dtype=dtype, progress=False)
    stored = full_batch(cache)["teacher_logprobs"]
    expected = reference_logprobs(teacher, dataset).to(getattr(torch, dtype)).float()
    assert stored.dtype == torch.float32 and stored.shape == (len(dataset), SEQ_LEN - 1, VOCAB_SIZE)
    assert torch.equal(stored, expected)
    value_type = cache.dataset.features["logprobs"].feature.feature.dtype
    assert value_type == ("float16" if dtype == "float16" else "uint16")
    assert cache.manifest["dtype"] == dtype


@pytest.mark.parametrize(("mode", "dtype"), [("topk", "bfloat16"), ("sampled", "float16"), ("dense", "float16")])
def test_batched_column_reads_equal_row_by_row_collate(teacher, dataset, tmp_path, mode, dtype):
    """CacheRows' one-take batches (across shards, shuffled) collate exactly like rows read one by one."""
    from hf_capgap.cache import CacheColumns, CacheRows

    cache = TeacherCache.build(
        teacher, dataset, tmp_path / "c", mode=mode, k=4, dtype=dtype, shard_tokens=5 * 16, progress=False
    )
    assert len(cache.manifest["shards"]) > 1
    rows, order = CacheRows(cache.dataset), [7, 0, 11, 3, 5]
    columns = rows.__getitems__(order)
    assert isinstance(columns, CacheColumns) and len(rows) == len(dataset)
    by_rows = cache.collate([cache.dataset.with_format("numpy")[i] for i in order])
    by_columns = cache.collate(columns)
    assert by_rows.keys() == by_columns.keys()
    for key, value in by_rows.items():
        assert by_columns[key].dtype == value.dtype and torch.equal(by_columns[key], value), key
    single = rows[order[3]]
    assert single.keys() == columns.keys() and all(np.array_equal(single[k], columns[k][3]) for k in single)


def test_id_width_follows_vocab(teacher, dataset, tmp_path):
    small = TeacherCache.build(teacher, dataset, tmp_path / "small", mode="topk", k=4, progress=False)
    big_vocab = (1 << 16) + 8
    big_teacher = make_teacher(vocab_size=big_vocab)
    big_data = make_dataset(rows=2, seq_len=4, vocab_size=big_vocab)
    big = TeacherCache.build(big_teacher, big_data, tmp_path / "big", mode="topk", k=4, progress=False)

    assert small.dataset.features["topk_ids"].feature.feature.dtype == "uint16"
    assert big.dataset.features["topk_ids"].feature.feature.dtype == "uint32"
    assert big.manifest["id_dtype"] == "uint32"
    expected_ids = reference_logprobs(big_teacher, big_data).topk(4, dim=-1).indices
    assert torch.equal(full_batch(big)["teacher_topk_ids"], expected_ids)
    assert expected_ids.max() >= 0 and big.bytes_per_token == 4 * (4 + 2) + 4


def _tokenizer(size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def test_load_refuses_foreign_fingerprints(teacher, dataset, tmp_path):
    from hf_capgap.artifacts import dataset_fingerprint, model_fingerprint

    tokenizer = _tokenizer(VOCAB_SIZE)
    path = tmp_path / "c"
    TeacherCache.build(teacher, dataset, path, k=4, temperature=2.0, tokenizer=tokenizer, progress=False)
    own = {
        "teacher_fingerprint": model_fingerprint(teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "temperature": 2.0,
    }
    assert len(TeacherCache.load(path, **own)) == len(dataset)

    foreign = {
        "teacher_fingerprint": model_fingerprint(make_teacher(seed=1)),
        "tokenizer_fingerprint": tokenizer_fingerprint(_tokenizer(VOCAB_SIZE - 1)),
        "dataset_fingerprint": dataset_fingerprint(make_dataset(rows=12, seed=1)),
        "temperature": 1.0,
    }
    for field, value in foreign.items():
        with pytest.raises(ArtifactError, match=field) as refused:
            TeacherCache.load(path, **{**own, field: value})
        assert str(own[field]) in str(refused.value) and str(value) in str(refused.value)
        assert "Rebuild" in str(refused.value)


def test_corrupted_and_truncated_shards_are_detected(teacher, dataset, tmp_path):
    path = tmp_path / "c"
    TeacherCache.build(teacher, dataset, path, k=4, shard_tokens=4 * SEQ_LEN, progress=False)
    shard = path / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    cache = TeacherCache.load(path)
    with pytest.raises(ArtifactError, match="shard-00001.arrow.*sha256"):
        cache.verify()
    with pytest.raises(ArtifactError, match="sha256"):
        TeacherCache.load(path, verify=True)

    shard.write_bytes(bytes(data[: len(data) - 100]))
    with pytest.raises(ArtifactError, match="shard-00001.arrow has .* bytes"):
        TeacherCache.load(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": make_dataset(rows=0)}, "dataset is empty"),
        ({"k": VOCAB_SIZE + 1}, "k=129 exceeds the teacher vocabulary"),
        ({"mode": "logits"}, "mode='logits'"),
        ({"temperature": 0.0}, "temperature"),
        ({"dtype": "float32"}, "dtype='float32'"),
        ({"dataset": make_dataset(rows=2, vocab_size=2 * VOCAB_SIZE)}, "tokenized for another model"),
        ({"tokenizer": _tokenizer(2 * VOCAB_SIZE)}, "tokenizer has 256 tokens"),
    ],
)
def test_bad_input_fails_before_the_teacher_runs(teacher, dataset, tmp_path, change, message):
    calls, handle = count_forwards(teacher)
    options = {"dataset": dataset, "mode": "topk", "k": 4, "progress": False} | change
    try:
        with pytest.raises(ValueError, match=message):
            TeacherCache.build(teacher, path=tmp_path / "c", **options)
    finally:
        handle.remove()
    assert calls == [] and not (tmp_path / "c").exists()


def test_existing_cache_is_reused_refused_or_overwritten(teacher, dataset, tmp_path):
    path = tmp_path / "c"
    first = TeacherCache.build(teacher, dataset, path, k=4, progress=False)
    calls, handle = count_forwards(teacher)
    try:
        again = TeacherCache.build(teacher, dataset, path, k=4, progress=False)
        assert calls == [] and again.manifest == first.manifest
        with pytest.raises(ArtifactError, match="k: on disk 4, requested 6.*overwrite=True"):
            TeacherCache.build(teacher, dataset, path, k=6, progress=False)
        replaced = TeacherCache.build(teacher, dataset, path, k=6, progress=False, overwrite=True)
    finally:
        handle.remove()
    assert calls and replaced.manifest["k"] == 6
    assert full_batch(replaced)["teacher_topk_ids"].shape[-1] == 6


def build_like_script(path):
    """The build that tests/cache_build_script.py runs with its defaults, here in-process."""
    return TeacherCache.build(
        make_teacher(), make_dataset(), path, k=8, batch_size=2, shard_tokens=3 * SEQ_LEN, progress=False
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted one-process build that interrupted and multi-process builds must reproduce."""
    return build_like_script(tmp_path_factory.mktemp("reference") / "cache")


def test_resume_after_sigkill_equals_uninterrupted_build(tmp_path, reference):
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--delay", "0.1"], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (out / "shard-00000.arrow").exists():
        assert process.poll() is None and time.monotonic() < deadline, "build never wrote its first shard"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "capgap_manifest.json").exists(), "the kill must land mid-build"
    survivors = {p.name: p.stat().st_ino for p in out.glob("shard-*.arrow")}
    assert 1 <= len(survivors) < 8

    build_like_script(out)
    resumed = TeacherCache.load(out, verify=True)
    assert {p.name: p.stat().st_ino for p in out.glob("shard-*.arrow") if p.name in survivors} == survivors
    assert shard_files(out) == shard_files(reference.path)
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [
        s["sha256"] for s in reference.manifest["shards"]
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.path.iterdir())


def test_two_process_accelerate_build_equals_single_process(tmp_path, reference):
    out, ranks = tmp_path / "multi", tmp_path / "ranks"
    ranks.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(SCRIPT), "--out", str(out), "--rank-dir", str(ranks),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=180, check=True)

    assert sorted(p.read_text().split()[0] for p in ranks.iterdir()) == ["2", "2"]
    assert sorted(p.name for p in ranks.iterdir()) == ["rank-0.txt", "rank-1.txt"]
    multi = TeacherCache.load(out, verify=True)
    assert shard_files(out) == shard_files(reference.path)
    settled = [
        {k: v for k, v in m.items() if k != "created_at"} for m in (multi.manifest, reference.manifest)
    ]
    assert settled[0] == settled[1]


def test_shards_are_plain_arrow_streams(teacher, dataset, tmp_path):
    cache = TeacherCache.build(teacher, dataset, tmp_path / "c", k=4, progress=False)
    with pa.memory_map(str(cache.path / "shard-00000.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.column_names == ["input_ids", "labels", "topk_ids", "topk_logprobs", "tail_logprob"]
    assert sum(s["bytes"] for s in cache.manifest["shards"]) == sum(
        p.stat().st_size for p in cache.path.glob("shard-*")
    )


def test_cli_builds_describes_and_verifies(teacher, dataset, tmp_path, capsys):
    from hf_capgap.cli import main

    teacher.save_pretrained(tmp_path / "teacher")
    dataset.save_to_disk(tmp_path / "data")
    out = tmp_path / "cache"
    build = [
        "cache",
        "build",
        str(tmp_path / "teacher"),
        "--dataset",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    assert main([*build, "--mode", "topk", "--k", "4", "--shard-tokens", str(4 * SEQ_LEN)]) == 0
    assert main(["cache", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert (
        "mode         topk" in info and "bytes/token  20.0" in info and f"sequences    {len(dataset)}" in info
    )
    assert main(["cache", "verify", str(out)]) == 0
    assert "ok: 3 shards" in capsys.readouterr().out

    cached = full_batch(TeacherCache.load(out))["teacher_topk_ids"]
    assert torch.equal(cached, reference_logprobs(teacher, dataset).topk(4, dim=-1).indices)

    shard = out / "shard-00002.arrow"
    shard.write_bytes(shard.read_bytes()[::-1])
    assert main(["cache", "verify", str(out)]) == 2
    assert "shard-00002.arrow" in capsys.readouterr().err
    assert main([*build[:4], str(tmp_path / "missing"), "--out", str(tmp_path / "other")]) == 2
    assert "is not a folder" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_build_refuses_foreign_files_and_unrecorded_shards(teacher, dataset, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="notes.txt"):
        TeacherCache.build(teacher, dataset, foreign, k=4, progress=False, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    orphan = tmp_path / "orphan"
    TeacherCache.build(teacher, dataset, orphan, k=4, progress=False)
    (orphan / "capgap_manifest.json").unlink()
    with pytest.raises(ArtifactError, match="settings are unknown"):
        TeacherCache.build(teacher, dataset, orphan, k=4, progress=False)
    rebuilt = TeacherCache.build(teacher, dataset, orphan, k=4, progress=False, overwrite=True)
    assert rebuilt.manifest["k"] == 4 and len(rebuilt) == len(dataset)
