"""DistillationTrainer reading the teacher's signal from a TeacherCache instead of a teacher model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset

from hf_capgap import DistillationConfig, DistillationTrainer, TeacherCache
from hf_capgap.artifacts import ArtifactError

VOCAB, SEQ = 40, 12


@pytest.fixture(scope="module")
def packed() -> Dataset:
    generator = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, VOCAB, (16, SEQ), generator=generator).tolist()})


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(3)
    return tiny_llama(VOCAB, hidden=32, layers=1).eval()


def args(tmp_path, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", learning_rate=1e-3, temperature=2.0, alpha=0.6,
    )
    settings.update(overrides)
    return DistillationConfig(**settings)


@pytest.mark.parametrize("mode,k", [("dense", VOCAB), ("topk", VOCAB)])
def test_cached_loss_equals_online_loss(tmp_path, packed, teacher, mode, k):
    """A dense cache, or a top-k cache with k = vocab, carries the whole teacher distribution."""
    path = tmp_path / f"cache-{mode}"
    TeacherCache.build(teacher, packed, path, mode=mode, k=k, temperature=2.0, progress=False, dtype="float16")
    student = tiny_llama(VOCAB, hidden=16)
    cached = DistillationTrainer(model=student, args=args(tmp_path, teacher_cache=str(path)), train_dataset=packed)
    online = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path))
    cache = TeacherCache.load(path)
    batch = cache.collate([cache.dataset[i] for i in range(4)])
    loss_cached = cached.compute_loss(student, batch)
    loss_online = online.compute_loss(student, {key: batch[key] for key in ("input_ids", "attention_mask", "labels")})
    torch.testing.assert_close(loss_cached, loss_online, rtol=2e-3, atol=2e-3)  # fp16 storage


def test_training_from_a_cache_needs_no_teacher_and_keeps_rows_aligned(tmp_path, packed, teacher):
    path = tmp_path / "cache"
    TeacherCache.build(teacher, packed, path, mode="topk", k=8, temperature=2.0, progress=False)
    seen: list[torch.Tensor] = []
    cache = TeacherCache.load(path)
    by_ids = {tuple(row["input_ids"]): row["topk_ids"] for row in cache.dataset}

    class Recording(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            for ids, topk in zip(inputs["input_ids"], inputs["teacher_topk_ids"], strict=True):
                seen.append(torch.equal(topk, torch.as_tensor(by_ids[tuple(ids.tolist())])))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Recording(
        model=tiny_llama(VOCAB, hidden=16),
        args=args(tmp_path, teacher_cache=str(path), max_steps=-1, num_train_epochs=2),
        train_dataset=packed,
    )
    assert trainer.teacher is None
    trainer.train()
    assert len(seen) == 2 * len(packed) and all(seen)


def test_stale_cache_is_refused(tmp_path, packed, teacher):
    path = tmp_path / "cache"
    TeacherCache.build(teacher, packed, path, mode="topk", k=4, temperature=2.0, progress=False)
    other_data = packed.map(lambda row: {"input_ids": row["input_ids"][::-1]})
    with pytest.raises(ArtifactError, match="dataset_fingerprint"):
        DistillationTrainer(model=tiny_llama(VOCAB), args=args(tmp_path, teacher_cache=str(path)), train_dataset=other_data)
    with pytest.raises(ArtifactError, match="temperature"):
        DistillationTrainer(model=tiny_llama(VOCAB), args=args(tmp_path, teacher_cache=str(path), temperature=1.0))
    with pytest.raises(ValueError, match="not both"):
        DistillationTrainer(model=tiny_llama(VOCAB), teacher_model=teacher, args=args(tmp_path, teacher_cache=str(path)))
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        DistillationTrainer(model=tiny_llama(VOCAB), args=args(tmp_path, teacher_cache=str(tmp_path / "missing")))


def test_uncached_eval_set_reports_cross_entropy(tmp_path, packed, teacher):
    path = tmp_path / "cache"
    TeacherCache.build(teacher, packed, path, mode="topk", k=4, temperature=2.0, progress=False)
    trainer = DistillationTrainer(
        model=tiny_llama(VOCAB, hidden=16), args=args(tmp_path, teacher_cache=str(path)), eval_dataset=packed.select(range(8))
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce_loss"], rel=1e-5)
    assert "eval_distill_loss" not in metrics
