"""TeacherCache: cached signals equal the teacher's own log-probs at exactly the labelled positions of
the trainer's batches, sampled signals are unbiased, and bad or stale caches are refused."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from datasets import Dataset

from hf_capgap.cache import TeacherCache
from hf_capgap.cache.format import LOGPROB_FLOOR, TEACHER_BATCH_KEYS, sampled_bytes_bound
from hf_capgap.data import make_collator
from hf_capgap.models import vocabulary_fingerprint
from hf_capgap.trainer import DistillationConfig
from hf_capgap.utils.artifacts import ArtifactError, dataset_fingerprint, model_fingerprint
from tests.conftest import CHAT_ROWS, CHAT_VOCAB_SIZE, TINY_TEXT, chat_tokenizer, tiny_qwen2
from tests.helpers.cache_build_script import SEQ_LEN, VOCAB_SIZE, make_dataset, make_teacher

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "helpers" / "cache_build_script.py"
TWO_PROCESS_BUILD = [
    *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
    *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"),
    str(SCRIPT),
]  # the build script under two gloo processes (with ACCELERATE_USE_CPU=1)
MASKED_PREFIX = SEQ_LEN // 4  # make_dataset(labels=True) masks the first SEQ_LEN // 4 labels of a row


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


@pytest.fixture(scope="module")
def plain_args():
    return DistillationConfig(output_dir="unused", report_to=[])


def config(**settings) -> DistillationConfig:
    return DistillationConfig(output_dir="unused", report_to=[], **settings)


def expected_logprobs(teacher, cache, temperature=1.0):
    """The teacher's log-probs over the real vocabulary at every labelled position of the cached rows,
    each row (each document of a padding-free packed row) run alone: no padding, no neighbour."""
    parts = []
    for row in cache.dataset:
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        lengths = row["seq_lengths"] if cache.manifest["padding_free"] and "seq_lengths" in row else [len(ids)]
        start = 0
        for length in lengths:
            with torch.no_grad():
                logits = teacher(input_ids=ids[None, start : start + length]).logits[0, :-1]
            logits = logits[:, : cache.real_vocab_size].float() / temperature
            parts.append(torch.log_softmax(logits, -1)[labels[start + 1 : start + length] != -100])
            start += length
    return torch.cat(parts)


def full_batch(cache, args):
    """Every cached row in order, collated by the trainer's collator through the cache collator."""
    return cache.collator(make_collator(None, args))(cache.rows().__getitems__(range(len(cache))))


def labelled(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    return calls, handle


def shard_files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("shard-*.arrow"))}


def test_topk_matches_teacher_at_labelled_positions_and_tail_closes_the_distribution(
    teacher, dataset, plain_args, tmp_path
):
    cache = TeacherCache.build(
        teacher, dataset, tmp_path / "c", mode="topk", k=8, batch_size=5, shard_tokens=4 * SEQ_LEN, progress=False
    )
    batch = full_batch(cache, plain_args)
    top_values, top_ids = expected_logprobs(teacher, cache).topk(8, dim=-1)
    positions = len(dataset) * (SEQ_LEN - MASKED_PREFIX)  # labels 1..15, of which 1..3 masked

    assert len(cache) == len(dataset) == len(cache.dataset) and len(cache.manifest["shards"]) == 3
    assert cache.manifest["num_positions"] == labelled(batch) == positions
    assert torch.equal(batch["teacher_topk_ids"], top_ids)
    torch.testing.assert_close(batch["teacher_topk_logprobs"], top_values, atol=1e-2, rtol=1e-3)
    mass = torch.logsumexp(torch.cat([batch["teacher_topk_logprobs"], batch["teacher_tail_logprob"][:, None]], -1), -1)
    torch.testing.assert_close(mass, torch.zeros_like(mass), atol=2e-3, rtol=0)
    assert torch.equal(batch["labels"], torch.tensor(dataset["labels"]))
    assert torch.equal(batch["input_ids"], torch.tensor(dataset["input_ids"]))
    assert {key: (tuple(value.shape), value.dtype) for key, value in batch.items() if key.startswith("teacher_")} == {
        "teacher_topk_ids": ((positions, 8), torch.long),
        "teacher_topk_logprobs": ((positions, 8), torch.float32),
        "teacher_tail_logprob": ((positions,), torch.float32),
    }
    assert set(TEACHER_BATCH_KEYS["topk"]) <= set(batch)
    signal = cache.teacher_signal(batch)
    assert signal.num_rows == positions and torch.equal(signal.ids, top_ids)
    # uint8 ids (vocabulary 128) + fp16 values per slot, float32 tail, and per row one int32 list offset in
    # each of the 3 columns (spread over its 12 positions here; nothing over a real row of 1,000s).
    assert cache.bytes_per_token == pytest.approx(8 * (1 + 2) + 4 + 3 * 4 / 12, abs=0.1)


@pytest.mark.parametrize("mode", ["topk", "sampled", "dense"])
def test_the_builds_own_lm_head_blocks_equal_the_teachers_logits(teacher, dataset, tmp_path, monkeypatch, mode):
    """The build applies a fusable lm_head itself, a block of labelled positions at a time (the model's
    head never runs), and stores what a build from the model's full logits stores."""
    import hf_capgap.cache.encode as cache_encode

    calls, handle = count_forwards(teacher.lm_head)
    monkeypatch.setattr(cache_encode, "CPU_HEAD_ELEMENTS", 5 * VOCAB_SIZE)  # blocks of 5 positions, across rows
    monkeypatch.setattr(cache_encode, "CPU_SIGNAL_ELEMENTS", 2 * VOCAB_SIZE)
    fused = TeacherCache.build(teacher, dataset, tmp_path / "fused", mode=mode, k=8, progress=False)
    handle.remove()
    monkeypatch.setattr(cache_encode, "fusable_head", lambda model: None)
    plain = TeacherCache.build(teacher, dataset, tmp_path / "plain", mode=mode, k=8, progress=False)

    assert not calls, "the model's own lm_head never ran: no [batch, seq, vocab] logits"
    for name in fused.dataset.column_names:
        ours, theirs = fused.dataset[name], plain.dataset[name]
        if name in (
            "input_ids",
            "labels",
            "topk_ids",
            "sample_id_gaps",
            "sample_sizes",
            "repeat_slots",
            "repeat_counts",
            "repeat_sizes",
        ):
            assert ours == theirs, name
        else:
            flat = [torch.tensor(row, dtype=torch.float32).reshape(-1) for row in (ours, theirs)]
            torch.testing.assert_close(*flat, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["topk", "sampled", "dense"])
def test_batches_without_a_labelled_position_store_empty_signals(teacher, plain_args, tmp_path, mode):
    """Rows whose only label is their first token predict nothing; alone in a batch, they still get a row."""
    ids = torch.randint(0, VOCAB_SIZE, (3, 8), generator=torch.Generator().manual_seed(0)).tolist()
    labels = [[row[0]] + [-100] * 7 for row in ids[:2]] + [ids[2]]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
    cache = TeacherCache.build(teacher, dataset, tmp_path / "c", mode=mode, k=4, batch_size=1, progress=False)
    batch = full_batch(cache, plain_args)
    assert len(cache) == 3 and cache.manifest["num_positions"] == labelled(batch) == 7
    assert all(len(value) == 7 for key, value in batch.items() if key.startswith("teacher_"))


def test_topk_with_k_equal_vocab_stores_floor_tail(teacher, plain_args, tmp_path):
    cache = TeacherCache.build(
        teacher, make_dataset(rows=2), tmp_path / "c", mode="topk", k=VOCAB_SIZE, progress=False
    )
    assert torch.all(full_batch(cache, plain_args)["teacher_tail_logprob"] == LOGPROB_FLOOR)


def peaked_teacher(vocab_size):
    """A random teacher whose next-token distributions are far from uniform."""
    model = make_teacher(vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def test_sampled_stores_distinct_ids_with_counts_that_follow_the_teacher(plain_args, tmp_path):
    vocab, draws, temperature, repeats = 64, 64, 0.5, 128
    teacher = peaked_teacher(vocab)
    # One short row repeated: every copy draws independently (own seed), so each position gets repeats*draws.
    dataset = make_dataset(rows=1, seq_len=5, vocab_size=vocab).select([0] * repeats).flatten_indices()
    cache = TeacherCache.build(
        teacher, dataset, tmp_path / "a", mode="sampled", k=draws, temperature=temperature, progress=False
    )
    batch = full_batch(cache, plain_args)
    ids, counts = batch["teacher_sample_ids"], batch["teacher_sample_counts"]
    expected = expected_logprobs(teacher, cache, temperature)

    assert torch.all(counts.sum(-1) == draws)
    used = counts > 0
    assert torch.all(ids[:, 1:][used[:, 1:]] > ids[:, :-1][used[:, 1:]]), "distinct ids, ascending"
    assert torch.all(ids[~used] == 0)
    stored = sum(sum(row["sample_sizes"]) for row in cache.dataset)
    assert stored == int(used.sum()) < used.numel(), "only distinct ids are stored, no padding slots"
    entropy = -(expected.exp() * expected).sum(-1)
    torch.testing.assert_close(batch["teacher_entropy"], entropy, atol=5e-3, rtol=2e-3)
    frequencies = torch.zeros_like(expected).scatter_add_(-1, ids, counts).view(repeats, 4, vocab).sum(0)
    probs = expected[:4].exp()
    assert (frequencies / (repeats * draws) - probs).abs().max() < 0.04
    assert (probs - probs.roll(1, dims=0)).abs().max() > 0.1, "positions differ, so the check above has teeth"

    rebuilt = TeacherCache.build(
        teacher,
        dataset,
        tmp_path / "b",
        mode="sampled",
        k=draws,
        temperature=temperature,
        batch_size=3,
        progress=False,
    )
    again = full_batch(rebuilt, plain_args)
    assert torch.equal(again["teacher_sample_ids"], ids) and torch.equal(again["teacher_sample_counts"], counts)


def sampled_gradients(sampler: str, trials: int, draws: int = 4):
    """(dense forward-KL gradient and loss, the gradients and losses of ``trials`` sampled signals)
    drawn by the cache build's own code, at T = 2."""
    from hf_capgap.cache import padded_samples
    from hf_capgap.cache.encode import block_signal, sampling_points
    from hf_capgap.losses import DenseTeacher, LossSpec, SampledTeacher, distillation_loss

    generator = torch.Generator().manual_seed(0)
    # Every token likely enough to be drawn often, so each gradient entry's standard error is measurable.
    rows, vocab, temperature = 4, 12, 2.0
    teacher_logits = torch.randn(rows, vocab, generator=generator)
    student_logits = torch.randn(rows, vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    spec = LossSpec(temperature=temperature, alpha=1.0)
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    storage = {"mode": "sampled", "k": draws, "real_vocab_size": vocab, "id_dtype": "uint8", "dtype": "float16"}

    def gradient(teacher) -> tuple[torch.Tensor, torch.Tensor]:
        logits = student_logits.clone().requires_grad_(True)
        loss = distillation_loss(logits, teacher, labels, spec).loss
        loss.backward()
        return logits.grad, loss.detach()

    dense = gradient(DenseTeacher(teacher_logits))
    grads, losses = [], []
    for trial in range(trials):
        points = sampling_points(rows, draws, sampler, torch.Generator().manual_seed(trial), "cpu")
        signal = block_signal(teacher_logits / temperature, storage, points)
        ids, counts = padded_samples(signal)
        grad, loss = gradient(SampledTeacher(torch.from_numpy(ids), torch.from_numpy(counts), entropy=entropy))
        grads.append(grad)
        losses.append(loss)
    return dense, torch.stack(grads), torch.stack(losses)


def test_sampling_resolves_unlikely_tokens_after_likely_ones():
    """A point in the middle of a token's share of the cumulative distribution draws that token, for
    a 1e-6 token behind a mass of 4, where one fp32 running sum (rounding at ~5e-7) cannot tell the
    tokens apart."""
    from hf_capgap.cache.encode import SEGMENT, inverse_cdf

    vocab = 4 * SEGMENT
    weights = torch.exp(torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) - 14)
    weights[0, :4] = 1.0
    cumulative = weights.double().cumsum(-1)
    middles = (cumulative - weights.double() / 2) / cumulative[:, -1:]
    ids, total = inverse_cdf(weights.clone(), middles)
    # Inside the first segment the likely tokens' mass still hides the unlikely ones (the bound).
    resolvable = torch.arange(vocab) >= SEGMENT
    assert torch.equal(ids[0, resolvable], torch.arange(vocab)[resolvable])
    assert total.item() == pytest.approx(cumulative[0, -1].item(), rel=1e-6)
    running = weights.cumsum(-1)
    naive = torch.searchsorted(running.double(), middles * running[:, -1:].double(), right=True)
    assert not torch.equal(naive[0, resolvable], torch.arange(vocab)[resolvable]), "the check has teeth"


@pytest.mark.parametrize("sampler", ["systematic", "multinomial"])
def test_sampled_forward_kl_gradient_is_unbiased(sampler):
    """The mean of many sampled-signal gradients converges to the dense forward-KL gradient."""
    trials = 1000
    (dense_grad, dense_loss), grads, losses = sampled_gradients(sampler, trials)
    z = (grads.mean(0) - dense_grad) / (grads.std(0) / trials**0.5)
    assert z.abs().max() < 4.5, "every gradient entry within 4.5 standard errors of the dense one"
    assert (grads[0] - dense_grad).norm() > 10 * (grads.mean(0) - dense_grad).norm(), "one draw alone is noisy"
    assert abs(losses.mean() - dense_loss) < 4.5 * losses.std() / trials**0.5


def test_systematic_draws_have_less_gradient_noise_than_independent_ones():
    """Same draws: systematic points leave the counts of tokens above 1 / draws almost exact."""
    (dense_grad, _), systematic, _ = sampled_gradients("systematic", 200, draws=16)
    (_, _), multinomial, _ = sampled_gradients("multinomial", 200, draws=16)
    error = {name: (grads - dense_grad).pow(2).sum((1, 2)).mean() for name, grads in
             (("systematic", systematic), ("multinomial", multinomial))}  # fmt: skip
    assert error["systematic"] < 0.5 * error["multinomial"]


def test_bytes_per_token_budget_picks_the_draws(tmp_path):
    """More budget buys more draws, and the stored distinct ids fill about the budget."""
    teacher, dataset = peaked_teacher(64), make_dataset(rows=8, seq_len=33, vocab_size=64)
    draws, stored = [], []
    for budget in (12, 24):
        cache = TeacherCache.build(
            teacher, dataset, tmp_path / str(budget), mode="sampled", bytes_per_token=budget, progress=False
        )
        draws.append(cache.manifest["draws"])
        stored.append(cache.bytes_per_token)
    assert 1 < draws[0] < draws[1] <= 255
    assert stored[0] == pytest.approx(12, rel=0.2) and stored[1] == pytest.approx(24, rel=0.2)


def test_a_budget_is_met_as_the_manifest_counts_the_bytes(tmp_path):
    """Rows of 16 labelled positions: the list offsets stored with them (4 bytes per row and signal column,
    1.5 bytes a position) count against the budget, so the manifest's bytes per token stay within it. On
    rows too short for even one draw to fit, the budget is refused."""
    teacher, dataset = peaked_teacher(64), make_dataset(rows=8, seq_len=17, vocab_size=64)
    draws = []
    for budget in (8, 16, 30):
        cache = TeacherCache.build(
            teacher, dataset, tmp_path / str(budget), mode="sampled", bytes_per_token=budget, progress=False
        )
        draws.append(cache.manifest["draws"])
        assert cache.bytes_per_token <= budget
    assert draws == sorted(draws) and draws[0] < draws[-1]
    with pytest.raises(ValueError, match=r"bytes_per_token=8: one draw already takes 1\d\.\d\d bytes"):
        TeacherCache.build(teacher, make_dataset(rows=8, seq_len=3, vocab_size=64), tmp_path / "short",
                           mode="sampled", bytes_per_token=8, progress=False)  # fmt: skip


def test_a_budget_is_measured_on_the_first_labelled_positions_whatever_the_batch_size(teacher, tmp_path):
    """The draws are measured on the first rows holding BUDGET_POSITIONS labelled positions, read past rows
    with none, so every batch_size picks the same number (a rerun with another one resumes, not refused)."""
    ids = torch.randint(0, VOCAB_SIZE, (3, 8), generator=torch.Generator().manual_seed(0)).tolist()
    labels = [[row[0]] + [-100] * 7 for row in ids[:2]] + [ids[2]]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
    draws = []
    for batch_size in (1, 2, 3):
        cache = TeacherCache.build(teacher, dataset, tmp_path / "c", mode="sampled", bytes_per_token=20,
                                   batch_size=batch_size, progress=False)  # fmt: skip
        draws.append(cache.manifest["draws"])
        assert cache.manifest["num_positions"] == 7
    assert draws[0] > 1 and draws == [draws[0]] * 3


def refusing_batches_over(teacher, rows: int, error: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
    """A forward hook raising ``error`` (a device out-of-memory message by default) on batches of more rows."""

    def refuse(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError(error) if "out of memory" in error else RuntimeError(error)

    return teacher.register_forward_pre_hook(refuse, with_kwargs=True)


def test_a_batch_that_runs_out_of_memory_is_halved_until_it_fits(teacher, dataset, tmp_path):
    """batch_size=8 on a device that fits 2 rows: the build warns, halves to 4 then 2, and writes what a build in
    batches of 2 writes, with the draws its budget picks on the same first 8 rows. Other errors, and a batch of
    one row that does not fit, still raise."""
    options = dict(mode="sampled", progress=False)
    measured = TeacherCache.build(teacher, dataset, tmp_path / "ample", bytes_per_token=20, batch_size=8, **options)
    draws = measured.manifest["draws"]
    reference = TeacherCache.build(teacher, dataset, tmp_path / "pairs", k=draws, batch_size=2, **options)
    handle = refusing_batches_over(teacher, 2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = TeacherCache.build(teacher, dataset, tmp_path / "halved", bytes_per_token=20, batch_size=8,
                                       **options)  # fmt: skip
    finally:
        handle.remove()
    assert [str(w.message) for w in caught if "memory" in str(w.message)] == [
        "teacher cache: a batch of 8 rows ran out of memory; continuing with batch_size=4.",
        "teacher cache: a batch of 4 rows ran out of memory; continuing with batch_size=2.",
    ]
    assert cache.manifest["draws"] == draws
    assert shard_files(cache.path) == shard_files(reference.path)

    for limit, error, match in ((0, None, "out of memory"), (2, "CUDA error: an illegal memory access", "illegal")):
        handle = refusing_batches_over(teacher, limit, *([error] if error else []))
        try:
            with pytest.raises(RuntimeError, match=match), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                TeacherCache.build(teacher, dataset, tmp_path / f"fails-{limit}", k=4, batch_size=8, **options)
        finally:
            handle.remove()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dense_roundtrips_storage_dtype(teacher, dataset, plain_args, tmp_path, dtype):
    cache = TeacherCache.build(teacher, dataset, tmp_path / "c", mode="dense", dtype=dtype, progress=False)
    stored = full_batch(cache, plain_args)["teacher_logprobs"]
    expected = expected_logprobs(teacher, cache).to(getattr(torch, dtype)).float()
    assert stored.dtype == torch.float32 and stored.shape == (cache.manifest["num_positions"], VOCAB_SIZE)
    torch.testing.assert_close(stored, expected, atol=1e-2, rtol=0)
    assert cache.dataset.features["logprobs"].feature.feature.dtype == ("float16" if dtype == "float16" else "uint16")
    assert cache.manifest["dtype"] == dtype


@pytest.mark.parametrize(("mode", "dtype"), [("topk", "bfloat16"), ("sampled", "float16"), ("dense", "float16")])
def test_shuffled_batch_reads_equal_row_by_row_collate(tiny_text_dataset, plain_args, tmp_path, mode, dtype):
    """Variable-length rows: one-take batches (across shards, shuffled) collate exactly like rows read one by
    one, and each row's signal moves with it."""
    teacher = make_teacher(vocab_size=32)
    cache = TeacherCache.build(
        teacher, tiny_text_dataset, tmp_path / "c", mode=mode, k=4, dtype=dtype, shard_tokens=60, progress=False
    )
    assert len(cache.manifest["shards"]) > 1 and len({len(row) for row in tiny_text_dataset["input_ids"]}) > 1
    rows, order = cache.rows(), [7, 0, 11, 3, 5]
    collate = cache.collator(make_collator(None, plain_args))
    by_take, by_rows = collate(rows.__getitems__(order)), collate([rows[i] for i in order])
    assert by_take.keys() == by_rows.keys()
    for key, value in by_take.items():
        assert by_rows[key].dtype == value.dtype and torch.equal(by_rows[key], value), key
    alone = [collate(rows.__getitems__([i])) for i in order]
    first = TEACHER_BATCH_KEYS[mode][0]
    if mode != "sampled":  # sampled rows pad their ids to the widest position of the batch
        assert torch.equal(torch.cat([batch[first] for batch in alone]), by_take[first])
    assert labelled(by_take) == sum(labelled(batch) for batch in alone) == len(by_take[first])


def test_messages_with_assistant_only_loss_store_only_assistant_positions(tmp_path):
    """A padded-vocabulary teacher (1,024 rows, 1,000 tokens) over chat rows: the signal covers exactly
    the assistant tokens, over the real vocabulary, and equals the teacher's own distributions there."""
    tokenizer, teacher = chat_tokenizer(), tiny_qwen2(1024).eval()
    args = config(assistant_only_loss=True)
    cache = TeacherCache.build(
        teacher, Dataset.from_dict({"messages": CHAT_ROWS}), tmp_path / "c", tokenizer=tokenizer, args=args,
        mode="dense", dtype="bfloat16", batch_size=5, progress=False,
    )  # fmt: skip
    batch = cache.collator(make_collator(tokenizer, args))(cache.rows().__getitems__(range(len(cache))))
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert cache.real_vocab_size == CHAT_VOCAB_SIZE and cache.manifest[
        "vocabulary_fingerprint"
    ] == vocabulary_fingerprint(tokenizer)
    assert batch["teacher_logprobs"].shape == (labelled(batch), CHAT_VOCAB_SIZE)
    assert cache.manifest["num_positions"] == labelled(batch) < cache.manifest["num_tokens"] / 2
    assert torch.all(batch["labels"][batch["input_ids"] == start] == -100), "prompt tokens cost nothing"
    torch.testing.assert_close(batch["teacher_logprobs"], expected_logprobs(teacher, cache), atol=3e-2, rtol=0)


def test_packed_rows_keep_documents_apart(tmp_path):
    """Packing (bfd: padding-free batches with position_ids): each document's signal is the teacher's on
    that document alone, and positions predicting the next document's first token store nothing."""
    tokenizer, teacher = chat_tokenizer(), tiny_qwen2(1024).eval()
    words = TINY_TEXT.split()
    texts = [
        " ".join(words[i : i + n])
        for i, n in zip(range(0, 300, 13), [5, 9, 3, 12, 7, 4, 10, 6, 8, 11, 5, 9], strict=False)
    ]
    args = config(packing=True, max_length=24)
    cache = TeacherCache.build(
        teacher, Dataset.from_dict({"text": texts}), tmp_path / "c", tokenizer=tokenizer, args=args, mode="topk",
        k=CHAT_VOCAB_SIZE, batch_size=3, progress=False,
    )  # fmt: skip
    batch = cache.collator(make_collator(tokenizer, args))(cache.rows().__getitems__(range(len(cache))))
    documents = sum(len(row["seq_lengths"]) for row in cache.dataset)
    assert cache.manifest["padding_free"] and batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    assert documents > len(cache) and labelled(batch) == cache.manifest["num_tokens"] - documents
    expected = expected_logprobs(teacher, cache)
    torch.testing.assert_close(
        batch["teacher_topk_logprobs"], expected.sort(-1, descending=True).values, atol=2e-2, rtol=0
    )


def test_collating_with_other_masking_than_the_build_is_refused(tmp_path):
    tokenizer, teacher = chat_tokenizer(), tiny_qwen2(1024).eval()
    texts = [" ".join(TINY_TEXT.split()[i : i + 9]) for i in range(0, 90, 9)]
    args = config(packing=True, max_length=24)
    cache = TeacherCache.build(
        teacher,
        Dataset.from_dict({"text": texts}),
        tmp_path / "c",
        tokenizer=tokenizer,
        args=args,
        k=4,
        progress=False,
    )
    padded = cache.collator(make_collator(tokenizer, config()))
    with pytest.raises(ArtifactError, match="padding_free=True"):
        padded(cache.rows().__getitems__(range(len(cache))))


def test_id_width_follows_the_real_vocabulary(teacher, dataset, plain_args, tmp_path):
    small = TeacherCache.build(teacher, dataset, tmp_path / "small", mode="topk", k=4, progress=False)
    big_vocab = (1 << 16) + 8
    big_teacher = make_teacher(vocab_size=big_vocab)
    big = TeacherCache.build(
        big_teacher, make_dataset(rows=2, seq_len=4, vocab_size=big_vocab), tmp_path / "big", mode="topk", k=4,
        progress=False,
    )  # fmt: skip
    assert small.dataset.features["topk_ids"].feature.feature.dtype == "uint8"
    assert big.dataset.features["topk_ids"].feature.feature.dtype == "uint32" and big.manifest["id_dtype"] == "uint32"
    expected_ids = expected_logprobs(big_teacher, big).topk(4, dim=-1).indices
    assert torch.equal(full_batch(big, plain_args)["teacher_topk_ids"], expected_ids)


def test_sampled_ids_of_a_vocabulary_beyond_16_bits_round_trip(plain_args, tmp_path):
    """Ids above 65,535 and gaps of three varint bytes come back as drawn: with 8 systematic draws, a
    token of probability above 1/8 is drawn at every position."""
    vocab = (1 << 16) + 8
    teacher = peaked_teacher(vocab)
    with torch.no_grad():  # a likely token at the top of the id range, far from the others
        teacher.lm_head.weight[vocab - 1] = teacher.lm_head.weight[vocab - 1].abs().mul(4)
    cache = TeacherCache.build(
        teacher, make_dataset(rows=4, seq_len=6, vocab_size=vocab), tmp_path / "c", mode="sampled", k=8, progress=False
    )
    batch = full_batch(cache, plain_args)
    ids, counts = batch["teacher_sample_ids"], batch["teacher_sample_counts"]
    probs = expected_logprobs(teacher, cache).exp()
    likely = probs > 1 / 8
    assert likely[:, vocab - 1].any(), "the top id is likely somewhere, so the check below reaches it"
    drawn = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, ids, counts > 0)
    assert torch.all(drawn[likely]) and torch.all(counts.sum(-1) == 8)
    assert int(ids.max()) < vocab and cache.bytes_per_token <= sampled_bytes_bound(8, vocab)


def test_load_refuses_foreign_fingerprints(tmp_path):
    tokenizer, teacher = chat_tokenizer(), tiny_qwen2(1024).eval()
    dataset = make_dataset(rows=4, vocab_size=CHAT_VOCAB_SIZE)
    path = tmp_path / "c"
    cache = TeacherCache.build(teacher, dataset, path, tokenizer=tokenizer, k=4, temperature=2.0, progress=False)
    own = {
        "teacher_fingerprint": model_fingerprint(teacher),
        "vocabulary_fingerprint": vocabulary_fingerprint(tokenizer),
        "dataset_fingerprint": cache.manifest["dataset_fingerprint"],
        "temperature": 2.0,
    }
    assert len(TeacherCache.load(path, **own)) == len(dataset)
    instruct = chat_tokenizer(eos_token="</s>", chat_template=None)  # same token -> id map, other roles
    assert TeacherCache.load(path, vocabulary_fingerprint=vocabulary_fingerprint(instruct)).real_vocab_size == 1000

    foreign = {
        "teacher_fingerprint": model_fingerprint(tiny_qwen2(1024, seed=1)),
        "vocabulary_fingerprint": vocabulary_fingerprint(chat_tokenizer(swap=(10, 11))),
        "dataset_fingerprint": dataset_fingerprint(make_dataset(rows=4, seed=1)),
        "temperature": 1.0,
    }
    for field, value in foreign.items():
        with pytest.raises(ArtifactError, match=field) as refused:
            TeacherCache.load(path, **{**own, field: value})
        assert str(own[field]) in str(refused.value) and str(value) in str(refused.value)
        assert "Rebuild" in str(refused.value)


@pytest.mark.parametrize("old", [2, 3])
def test_old_format_is_refused_with_a_rebuild_message(teacher, dataset, tmp_path, old):
    path = tmp_path / "c"
    TeacherCache.build(teacher, dataset, path, k=4, progress=False)
    manifest = json.loads((path / "capgap_manifest.json").read_text())
    (path / "capgap_manifest.json").write_text(json.dumps({**manifest, "format_version": old}))
    with pytest.raises(ArtifactError, match=f"format_version is {old}.*reads 4; rebuild"):
        TeacherCache.load(path)


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


def _tokenizer(size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"dataset": make_dataset(rows=0)}, ValueError, "dataset is empty"),
        ({"dataset": [[1, 2, 3]]}, TypeError, "datasets.Dataset"),
        ({"dataset": Dataset.from_dict({"text": ["a b"]})}, ValueError, "needs a tokenizer: pass processing_class"),
        ({"dataset": Dataset.from_dict({"body": ["a b"]})}, ValueError, "dataset_text_field"),
        ({"k": VOCAB_SIZE + 1}, ValueError, "k=129 exceeds the real vocabulary"),
        ({"mode": "sampled", "k": 256}, ValueError, "k <= 255"),
        ({"mode": "topk", "bytes_per_token": 50}, ValueError, "bytes_per_token=50 needs mode='sampled'"),
        ({"mode": "logits"}, ValueError, "mode='logits'"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"dtype": "float32"}, ValueError, "dtype='float32'"),
        ({"dataset": make_dataset(rows=2, vocab_size=2 * VOCAB_SIZE)}, ValueError, "tokenized for another model"),
        ({"tokenizer": _tokenizer(2 * VOCAB_SIZE)}, ValueError, "tokenizer has 256 tokens"),
        ({"dataset": Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, -100]]})}, ValueError, "no row"),
    ],
)
def test_bad_input_fails_before_the_teacher_runs(teacher, dataset, plain_args, tmp_path, change, error, message):
    calls, handle = count_forwards(teacher)
    options = {"dataset": dataset, "mode": "topk", "k": 4, "progress": False, "args": plain_args} | change
    try:
        with pytest.raises(error, match=message):
            TeacherCache.build(teacher, path=tmp_path / "c", **options)
    finally:
        handle.remove()
    assert calls == [] and not (tmp_path / "c").exists()


def test_existing_cache_is_reused_refused_or_overwritten(teacher, dataset, plain_args, tmp_path):
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
    assert full_batch(replaced, plain_args)["teacher_topk_ids"].shape[-1] == 6


def build_like_script(path):
    """The build that tests/helpers/cache_build_script.py runs with its defaults, here in-process."""
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
    deadline = time.monotonic() + 120
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
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.path.iterdir())


def test_two_process_accelerate_build_equals_single_process(tmp_path, reference):
    out, ranks = tmp_path / "multi", tmp_path / "ranks"
    ranks.mkdir()
    command = [
        *TWO_PROCESS_BUILD,
        "--out",
        str(out),
        "--rank-dir",
        str(ranks),
    ]
    subprocess.run(command, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=300, check=True)

    assert sorted(p.read_text().split()[0] for p in ranks.iterdir()) == ["2", "2"]
    assert sorted(p.name for p in ranks.iterdir()) == ["rank-0.txt", "rank-1.txt"]
    multi = TeacherCache.load(out, verify=True)
    assert shard_files(out) == shard_files(reference.path)
    settled = [{k: v for k, v in m.items() if k != "created_at"} for m in (multi.manifest, reference.manifest)]
    assert settled[0] == settled[1]


def test_ranks_that_measure_different_draws_for_a_budget_build_with_the_fewest(tmp_path):
    """Ranks measuring a bytes_per_token budget could round differently (here: each rank is given its
    own budget); all build one cache, with the draws of the smallest, as one process would."""
    script = [sys.executable, str(SCRIPT), "--mode", "sampled"]
    for budget in ("20", "30"):
        subprocess.run([*script, "--out", str(tmp_path / budget), "--bytes-per-token", budget], cwd=REPO, timeout=300,
                       check=True)  # fmt: skip
    command = [
        *TWO_PROCESS_BUILD,
        "--mode",
        "sampled",
        "--out",
        str(tmp_path / "multi"),
        "--bytes-per-token",
        "20",
        "30",
    ]
    subprocess.run(command, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=300, check=True)

    fewer, more = (TeacherCache.load(tmp_path / budget, verify=True) for budget in ("20", "30"))
    assert fewer.manifest["draws"] < more.manifest["draws"]
    multi = TeacherCache.load(tmp_path / "multi", verify=True)
    assert multi.manifest["draws"] == fewer.manifest["draws"]
    assert shard_files(multi.path) == shard_files(fewer.path)


def test_two_rank_build_with_an_fsdp2_sharded_teacher_equals_single_process(tmp_path):
    """A teacher whose weights FSDP2 shards over the ranks runs each forward as a collective. Five shards
    over two ranks give them 8 and 6 batches: the rank with fewer joins the others' forwards instead of
    hanging them, the fingerprint gathers the whole weights, and the files equal a one-process build of
    the unsharded teacher."""
    settings = ["--shard-tokens", str(5 * SEQ_LEN), "--mode", "sampled"]
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "one"), *settings], cwd=REPO, timeout=300,
                   check=True)  # fmt: skip
    command = [
        *TWO_PROCESS_BUILD,
        "--out",
        str(tmp_path / "sharded"),
        "--fully-shard",
        *settings,
    ]
    # ~20 s; ranks whose forwards went out of step would hang until the timeout
    subprocess.run(command, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=120, check=True)

    one, sharded = (
        TeacherCache.load(tmp_path / "one", verify=True),
        TeacherCache.load(tmp_path / "sharded", verify=True),
    )
    assert len(one.manifest["shards"]) == 5
    assert shard_files(sharded.path) == shard_files(one.path)
    assert sharded.manifest["teacher_fingerprint"] == one.manifest["teacher_fingerprint"]


def test_shards_are_plain_arrow_streams_and_the_manifest_says_how_they_were_made(teacher, dataset, tmp_path):
    cache = TeacherCache.build(teacher, dataset, tmp_path / "c", mode="sampled", k=16, progress=False)
    with pa.memory_map(str(cache.path / "shard-00000.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    assert table.column_names == [
        "input_ids",
        "labels",
        "sample_id_gaps",
        "sample_sizes",
        "repeat_slots",
        "repeat_counts",
        "repeat_sizes",
        "entropy",
    ]
    assert str(table.schema.field("repeat_counts").type) == "list<item: uint8>"
    assert sum(s["bytes"] for s in cache.manifest["shards"]) == sum(
        p.stat().st_size for p in cache.path.glob("shard-*")
    )
    m = cache.manifest
    assert (m["format_version"], m["mode"], m["draws"], m["sampler"], m["real_vocab_size"], m["teacher_dtype"]) == (
        4, "sampled", 16, "systematic", VOCAB_SIZE, "float32",
    )  # fmt: skip
    assert m["teacher_fingerprint"] == model_fingerprint(teacher) and m["dataset_fingerprint"]


def test_cli_builds_describes_and_verifies(teacher, dataset, plain_args, tmp_path, capsys):
    from hf_capgap.cli import main

    teacher.save_pretrained(tmp_path / "teacher")
    dataset.save_to_disk(tmp_path / "data")
    out = tmp_path / "cache"
    build = ["cache", "build", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data"), "--out", str(out)]
    assert main([*build, "--mode", "topk", "--k", "4", "--shard-tokens", str(4 * SEQ_LEN)]) == 0
    assert main(["cache", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert re.search(r"mode +topk\n", info) and re.search(r"bytes/token +17\.0\n", info)
    assert re.search(rf"sequences +{len(dataset)}\n", info) and re.search(r"vocabulary +128 real tokens\n", info)
    assert main(["cache", "verify", str(out)]) == 0
    assert "ok: 3 shards" in capsys.readouterr().out

    cache = TeacherCache.load(out)
    cached = full_batch(cache, plain_args)["teacher_topk_ids"]
    assert torch.equal(cached, expected_logprobs(teacher, cache).topk(4, dim=-1).indices)

    shard = out / "shard-00002.arrow"
    shard.write_bytes(shard.read_bytes()[::-1])
    assert main(["cache", "verify", str(out)]) == 2
    assert "shard-00002.arrow" in capsys.readouterr().err
    assert main([*build[:4], str(tmp_path / "missing"), "--out", str(tmp_path / "other")]) == 2
    assert "is not a folder" in capsys.readouterr().err and not (tmp_path / "other").exists()

    sampled = tmp_path / "sampled"
    assert main([*build[:-1], str(sampled), "--mode", "sampled", "--k", "8", "--sampler", "multinomial"]) == 0
    assert main(["cache", "info", str(sampled)]) == 0
    assert re.search(r"mode +sampled \(multinomial draws\)\n", capsys.readouterr().out)
    assert TeacherCache.load(sampled).manifest["sampler"] == "multinomial"


def test_cli_builds_with_the_trainers_data_settings_which_the_manifest_records(teacher, dataset, tmp_path):
    """``cache build --max_length 12``: rows cut at 12 tokens, and a trainer config must say the same."""
    from hf_capgap.cli import main

    teacher.save_pretrained(tmp_path / "teacher")
    dataset.save_to_disk(tmp_path / "data")
    out = tmp_path / "cache"
    build = ["cache", "build", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data"), "--out", str(out)]
    assert main([*build, "--k", "4", "--max_length", "12"]) == 0
    cache = TeacherCache.load(out, args=config(max_length=12))
    assert {len(row) for row in cache.dataset["input_ids"]} == {12}
    assert cache.manifest["preparation"] == {
        "dataset_format": "tokenized", "longest_untruncated_row": SEQ_LEN, "unlabelled_rows": 0,
        "skip_prepare_dataset": False, "max_length": 12, "packing": False, "shuffle_dataset": False,
        "truncation_mode": "keep_start",
    }  # fmt: skip
    with pytest.raises(ArtifactError, match=r"max_length: cache 12, config 16\).*--max_length 16"):
        TeacherCache.load(out, args=config(max_length=16))
    with pytest.raises(ArtifactError, match="packing: cache False, config True"):
        cache.check_preparation(config(max_length=12, packing=True))


def test_a_longer_max_length_is_refused_when_truncation_cut_or_dropped_a_row_and_accepted_when_none_was(tmp_path):
    """A prompt filling max_length=8 leaves its row without a label, and TRL then drops it: the rows at 8
    are not the rows at 64 even though every kept row is short. Rows that exactly reach max_length but were
    never cut give the same rows at any longer max_length, None included, and any truncation_mode."""
    teacher = tiny_qwen2(CHAT_VOCAB_SIZE)
    prompts = Dataset.from_dict(
        {
            "prompt": ["the cat sat on the mat . " * 3, "hello ", "what ? "],
            "completion": ["the dog", "a cat", "a bird"],
        }
    )
    dropped = TeacherCache.build(teacher, prompts, tmp_path / "dropped", tokenizer=chat_tokenizer(),
                                 args=config(max_length=8), k=4, progress=False)  # fmt: skip
    assert len(dropped) == 2
    for other, named in (
        ({"max_length": 64}, "max_length: cache 8, config 64"),
        ({"max_length": 8, "truncation_mode": "keep_end"}, "truncation_mode: cache 'keep_start'"),
    ):
        with pytest.raises(ArtifactError, match=re.escape(named)):
            TeacherCache.load(dropped.path, args=config(**other), tokenizer=chat_tokenizer())

    tokenizer = chat_tokenizer()
    texts = Dataset.from_dict({"text": ["the cat sat on the mat .", "a bird sang ."]})
    longest = max(len(tokenizer(text + tokenizer.eos_token)["input_ids"]) for text in texts["text"])
    uncut = TeacherCache.build(
        teacher, texts, tmp_path / "uncut", tokenizer=tokenizer, args=config(max_length=longest), k=4, progress=False
    )
    for other in ({"max_length": 64}, {"max_length": None}, {"max_length": longest, "truncation_mode": "keep_end"}):
        TeacherCache.load(uncut.path, args=config(**other), tokenizer=tokenizer)


def test_the_eos_checked_is_the_one_appended_to_the_text(tmp_path):
    """With eos_token=None TRL appends the tokenizer's eos: a base tokenizer's '</s>' and an instruct one's
    '<|im_end|>' (same vocabulary) give other rows, while eos_token='</s>' with a '</s>' tokenizer gives the same."""
    texts = Dataset.from_dict({"text": ["the cat sat on the mat .", "a bird sang ."]})
    base, instruct = chat_tokenizer(eos_token="</s>"), chat_tokenizer(eos_token="<|im_end|>")
    cache = TeacherCache.build(tiny_qwen2(CHAT_VOCAB_SIZE), texts, tmp_path / "c", tokenizer=base, args=config(),
                               k=4, progress=False)  # fmt: skip
    with pytest.raises(ArtifactError, match=re.escape("eos_token: cache '</s>', config '<|im_end|>'")):
        TeacherCache.load(cache.path, args=config(), tokenizer=instruct)
    TeacherCache.load(cache.path, args=config(eos_token="</s>"), tokenizer=chat_tokenizer(eos_token="</s>"))
    TeacherCache.load(cache.path, args=config(eos_token="</s>"), tokenizer=instruct)


def test_padding_free_without_packing_builds_at_no_max_length_as_trl_requires(teacher, dataset, tmp_path):
    """SFTTrainer refuses padding_free without packing at a max_length, so the build does too; the CLI takes
    --max_length None, and such a cache serves a max_length=None trainer; rows shorter than a max_length
    are the same without one."""
    from hf_capgap.cli import main

    with pytest.raises(ValueError, match="padding_free=True without packing.*max_length=None"):
        TeacherCache.build(teacher, dataset, tmp_path / "refused", args=config(padding_free=True), k=4, progress=False)
    teacher.save_pretrained(tmp_path / "teacher")
    dataset.save_to_disk(tmp_path / "data")
    out = tmp_path / "cache"
    build = ["cache", "build", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data"), "--out", str(out)]
    assert main([*build, "--k", "4", "--padding_free", "--max_length", "None"]) == 0
    cache = TeacherCache.load(out, args=config(padding_free=True, max_length=None))
    assert cache.manifest["padding_free"] and cache.manifest["preparation"]["max_length"] is None
    short = TeacherCache.build(teacher, dataset, tmp_path / "short", k=4, progress=False)
    TeacherCache.load(short.path, args=config(max_length=None))


def test_cli_builds_shuffled_rows_with_the_trainers_data_seed(teacher, dataset, tmp_path):
    """--shuffle_dataset with --data_seed (SFTConfig.seed; --seed is the sampled mode's) gives the rows a
    shuffle_dataset=True trainer with that seed trains on."""
    from hf_capgap.cli import main

    teacher.save_pretrained(tmp_path / "teacher")
    dataset.save_to_disk(tmp_path / "data")
    out = tmp_path / "cache"
    build = ["cache", "build", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "data"), "--out", str(out)]
    assert main([*build, "--k", "4", "--shuffle_dataset", "--data_seed", "3", "--seed", "5"]) == 0
    shuffled = config(shuffle_dataset=True, seed=3)
    cache = TeacherCache.load(out, args=shuffled, dataset_fingerprint=dataset_fingerprint(dataset.shuffle(seed=3)))
    assert cache.manifest["seed"] == 5
    with pytest.raises(ArtifactError, match=re.escape("seed: cache 3, config 42)") + ".*--data_seed 42"):
        TeacherCache.load(out, args=config(shuffle_dataset=True))


def test_a_cache_built_before_its_data_settings_were_recorded(teacher, dataset, tmp_path):
    """Such a cache still loads; a config is checked on padding_free (recorded since format 4) with a
    warning that the rest is not, and a build with matching settings adds them to its manifest."""
    from transformers.testing_utils import CaptureLogger

    import hf_capgap.cache.teacher_cache

    path = tmp_path / "c"
    built = TeacherCache.build(teacher, dataset, path, k=4, progress=False)
    manifest = {name: value for name, value in built.manifest.items() if name != "preparation"}
    (path / "capgap_manifest.json").write_text(json.dumps(manifest))
    with CaptureLogger(hf_capgap.cache.teacher_cache.logger) as captured:
        TeacherCache.load(path, args=config(max_length=4))
    assert "predates" in captured.out and "only padding_free is checked" in captured.out
    with pytest.raises(ArtifactError, match="padding_free: cache False, config True"):
        TeacherCache.load(path, args=config(padding_free=True))
    calls, handle = count_forwards(teacher)
    try:
        again = TeacherCache.build(teacher, dataset, path, k=4, progress=False)
    finally:
        handle.remove()
    assert calls == [] and again.manifest["preparation"] == built.manifest["preparation"]


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


def test_build_resumes_over_records_a_kill_left_half_written(teacher, dataset, tmp_path):
    """A kill inside an atomic write of the build record or the manifest leaves its temporary file; the
    rerun builds as into an empty folder and removes it."""
    clean = TeacherCache.build(teacher, dataset, tmp_path / "clean", k=4, progress=False)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "..build_spec.json.x1y2z3.tmp").write_text('{"kind": "teach')
    (killed / ".capgap_manifest.json.a1b2c3.tmp").write_text("{")
    resumed = TeacherCache.build(teacher, dataset, killed, k=4, progress=False)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.path.iterdir())
    assert shard_files(resumed.path) == shard_files(clean.path)


def test_points_at_the_very_end_draw_a_token_of_positive_weight():
    """Rounding can put a point at the total; it must still draw a real token, never a zero-weight slot."""
    from hf_capgap.cache.encode import SEGMENT, inverse_cdf

    weights = torch.zeros(2, 3 * SEGMENT)
    weights[0, :5] = 1.0  # the last two segments hold no mass (e.g. padding past the real vocabulary)
    weights[1, SEGMENT + 7] = 2.0
    ids, _ = inverse_cdf(weights.clone(), torch.tensor([[0.999, 1.0], [0.0, 1.0]], dtype=torch.float64))
    assert ids.tolist() == [[4, 4], [SEGMENT + 7, SEGMENT + 7]]
