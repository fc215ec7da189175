"""DistillationTrainer reading the teacher's signal from a TeacherCache instead of a teacher model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_capgap import DistillationConfig, DistillationTrainer, TeacherCache
from hf_capgap.cache.format import decode_id_gaps
from hf_capgap.utils.artifacts import ArtifactError
from tests.conftest import CHAT_ROWS, CHAT_TEMPLATE, CHAT_VOCAB_SIZE, chat_tokenizer, tiny_llama, tiny_qwen2

TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def chats() -> Dataset:
    return Dataset.from_dict({"messages": CHAT_ROWS})


@pytest.fixture(scope="module")
def teacher():
    """Padded embeddings: 1,024 logits for the tokenizer's 1,000 tokens."""
    return tiny_qwen2(1024, seed=3).eval()


def args(tmp_path, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", learning_rate=1e-3, temperature=TEMPERATURE, alpha=0.6,
        assistant_only_loss=True,
    )  # fmt: skip
    settings.update(overrides)
    return DistillationConfig(**settings)


def build(teacher, chats, tokenizer, path, tmp_path, **options) -> TeacherCache:
    return TeacherCache.build(
        teacher, chats, path, tokenizer=tokenizer, args=args(tmp_path), temperature=TEMPERATURE, progress=False,
        **options,
    )  # fmt: skip


def student_gradient(trainer, student, batch):
    student.zero_grad()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", ["dense", "topk"])
def test_cached_loss_equals_online_loss_on_a_padded_vocabulary_pair(tmp_path, chats, tokenizer, teacher, mode):
    """Student 1,008 logits, teacher 1,024, tokenizer 1,000; assistant-only labels. A dense cache, or a top-k
    cache with k = the real vocabulary, carries the whole teacher distribution over the same 1,000 tokens
    the online teacher uses: equal loss and gradient."""
    path = tmp_path / f"cache-{mode}"
    cache = build(teacher, chats, tokenizer, path, tmp_path, mode=mode, k=CHAT_VOCAB_SIZE, dtype="float16")
    student = tiny_qwen2(1008, seed=5)
    cached = DistillationTrainer(
        model=student, args=args(tmp_path, teacher_cache=str(path)), train_dataset=chats, processing_class=tokenizer
    )
    online = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=chats, processing_class=tokenizer
    )
    batch = next(iter(cached.get_train_dataloader()))
    plain = {key: value for key, value in batch.items() if not key.startswith("teacher_")}
    assert cache.real_vocab_size == CHAT_VOCAB_SIZE
    assert (
        len(cache.teacher_signal(batch).ids if mode == "topk" else batch["teacher_logprobs"])
        == int((batch["labels"][:, 1:] != -100).sum())
        < batch["labels"][:, 1:].numel()
    )
    loss_cached, grad_cached = student_gradient(cached, student, batch)
    loss_online, grad_online = student_gradient(online, student, plain)
    torch.testing.assert_close(loss_cached, loss_online, rtol=2e-3, atol=2e-3)  # fp16 storage
    torch.testing.assert_close(grad_cached, grad_online, rtol=2e-2, atol=2e-4)


def test_training_from_a_cache_keeps_rows_and_signals_together(tmp_path, tokenizer, teacher):
    """Shuffled, over two epochs: every batch's signal, split back per row, is that row's own signal."""
    # Distinct rows: each row draws its own samples, so equal rows would hold different signals.
    chats = Dataset.from_dict(
        {
            "messages": [
                [{**turn, "content": f"w{i} {turn['content']}"} for turn in chat] for i, chat in enumerate(CHAT_ROWS)
            ]
        }
    )
    path = tmp_path / "cache"
    cache = build(teacher, chats, tokenizer, path, tmp_path, mode="sampled", k=8)
    by_ids = {tuple(row["input_ids"]): decode_id_gaps(np.array(row["sample_id_gaps"]), np.array(row["sample_sizes"]))
              for row in cache.dataset}  # fmt: skip
    seen: list[bool] = []

    class Recording(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, counts = inputs["teacher_sample_ids"], inputs["teacher_sample_counts"]
            per_row = (inputs["labels"][:, 1:] != -100).sum(dim=1).tolist()
            for row, row_ids, row_counts in zip(
                inputs["input_ids"], ids.split(per_row), counts.split(per_row), strict=True
            ):
                stored = by_ids[tuple(row[row != tokenizer.pad_token_id].tolist())]
                seen.append(row_ids[row_counts > 0].tolist() == list(stored))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Recording(
        model=tiny_qwen2(1008, seed=5),
        args=args(tmp_path, teacher_cache=str(path), max_steps=-1, num_train_epochs=2, loss="forward_kl"),
        train_dataset=chats,
        processing_class=tokenizer,
    )
    assert trainer.teacher is None
    trainer.train()
    assert len(seen) == 2 * len(cache) and all(seen)


def test_stale_or_foreign_cache_is_refused(tmp_path, chats, tokenizer, teacher):
    path = tmp_path / "cache"
    build(teacher, chats, tokenizer, path, tmp_path, mode="topk", k=4)
    student = tiny_qwen2(1008, seed=5)

    def trainer(**options):
        settings = {"model": student, "processing_class": tokenizer, "args": args(tmp_path, teacher_cache=str(path))}
        return DistillationTrainer(**(settings | options))

    with pytest.raises(ArtifactError, match="dataset fingerprint"):
        trainer(train_dataset=chats.select(range(5)))
    with pytest.raises(ArtifactError, match="temperature"):
        trainer(args=args(tmp_path, teacher_cache=str(path), temperature=1.0))
    with pytest.raises(ValueError, match="not both"):
        trainer(teacher_model=teacher)
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        trainer(args=args(tmp_path, teacher_cache=str(tmp_path / "missing")))
    bigger = chat_tokenizer()
    bigger.add_tokens(["extra"])
    with pytest.raises(ValueError, match="1000 tokens but the student's tokenizer has 1001"):
        trainer(processing_class=bigger)


def test_uncached_eval_set_reports_cross_entropy(tmp_path, chats, tokenizer, teacher):
    path = tmp_path / "cache"
    build(teacher, chats, tokenizer, path, tmp_path, mode="topk", k=4)
    trainer = DistillationTrainer(
        model=tiny_llama(CHAT_VOCAB_SIZE, hidden=16),
        args=args(tmp_path, teacher_cache=str(path)),
        train_dataset=chats,
        processing_class=tokenizer,
        eval_dataset=chats.select(range(8)),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce_loss"], rel=1e-5)
    assert "eval_distill_loss" not in metrics


def test_a_chat_cache_trains_without_its_dataset_and_refuses_a_same_size_other_vocabulary(
    tmp_path, chats, tokenizer, teacher
):
    """The cached rows carry their assistant masks: the cache alone is a training set."""
    path = tmp_path / "cache"
    build(teacher, chats, tokenizer, path, tmp_path, mode="topk", k=4)
    trainer = DistillationTrainer(
        model=tiny_qwen2(1008, seed=5),
        args=args(tmp_path, teacher_cache=str(path), logging_steps=1),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.args.assistant_only_loss  # restored after set-up
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    with pytest.raises(ValueError, match="same size but another token -> id map"):
        DistillationTrainer(
            model=tiny_qwen2(1008, seed=5),
            args=args(tmp_path, teacher_cache=str(path)),
            processing_class=chat_tokenizer(swap=(7, 8)),
        )


def test_a_cache_refuses_a_config_with_other_data_settings_and_trains_on_matching_ones(
    tmp_path, chats, tokenizer, teacher
):
    """The cache's rows were prepared at max_length=40 with assistant-only labels. A trainer whose config
    would prepare other rows is refused before any preparation, naming the setting, with or without
    train_dataset; a matching config trains, and so does a longer max_length, since no row reached 40."""
    path = tmp_path / "cache"
    TeacherCache.build(teacher, chats, path, tokenizer=tokenizer, args=args(tmp_path, max_length=40),
                       temperature=TEMPERATURE, k=4, progress=False)  # fmt: skip

    def trainer(train_dataset=None, **overrides):
        config = args(tmp_path, teacher_cache=str(path), **{"max_length": 40, **overrides})
        return DistillationTrainer(
            model=tiny_qwen2(1008, seed=5), args=config, train_dataset=train_dataset, processing_class=tokenizer
        )

    for overrides, named in (
        ({"max_length": 16}, "max_length: cache 40, config 16"),
        ({"packing": True}, "packing: cache False, config True"),
        ({"assistant_only_loss": False}, "assistant_only_loss: cache True, config False"),
    ):
        for train_dataset in (None, chats):
            with pytest.raises(ArtifactError, match=re.escape(named)):
                trainer(train_dataset, **overrides)
    for matching in (trainer(), trainer(chats, max_length=64)):
        matching.train()
        assert matching.state.global_step == 2


def test_a_cache_built_with_the_trainers_formatting_func_trains_with_it(tmp_path, tokenizer, teacher):
    """SFTTrainer's formatting_func makes each row's text: a cache built with it holds the trainer's rows;
    one built without it holds others, which the dataset fingerprint refuses."""
    texts = Dataset.from_dict({"text": ["the cat sat on the mat .", "a bird sang .", "the dog ran to the tree ."] * 4})

    def formatting_func(row):
        return f"{row['text']} {row['text']}"

    settings = {"assistant_only_loss": False}
    path = tmp_path / "cache"
    TeacherCache.build(teacher, texts, path, tokenizer=tokenizer, args=args(tmp_path, **settings),
                       formatting_func=formatting_func, temperature=TEMPERATURE, k=4, progress=False)  # fmt: skip

    def trainer(formatting_func):
        return DistillationTrainer(
            model=tiny_qwen2(1008, seed=5), args=args(tmp_path, teacher_cache=str(path), **settings),
            train_dataset=texts, processing_class=tokenizer, formatting_func=formatting_func,
        )  # fmt: skip

    trained = trainer(formatting_func)
    trained.train()
    assert trained.state.global_step == 2
    with pytest.raises(ArtifactError, match="dataset fingerprint"):
        trainer(None)


def test_a_cache_holds_the_rows_of_the_trainers_chat_template_path_and_refuses_another_template(
    tmp_path, chats, teacher
):
    """SFTTrainer gives its tokenizer the chat_template_path template before preparing: so does the build,
    which records the template's hash; a trainer rendering chats with another template is refused."""
    path_of_template = tmp_path / "system.jinja"
    path_of_template.write_text(CHAT_TEMPLATE.replace("message['role'] + '\\n'", "message['role'] + ' system\\n'"))
    settings = {"chat_template_path": str(path_of_template), "max_length": 64}
    cache = TeacherCache.build(
        teacher,
        chats,
        tmp_path / "cache",
        tokenizer=chat_tokenizer(),
        args=args(tmp_path, **settings),
        temperature=TEMPERATURE,
        k=4,
        progress=False,
    )
    assert "user system" in chat_tokenizer().decode(cache.dataset[0]["input_ids"])

    def trainer(**overrides):
        config = args(tmp_path, teacher_cache=str(cache.path), **{**settings, **overrides})
        return DistillationTrainer(
            model=tiny_qwen2(1008, seed=5), args=config, train_dataset=chats, processing_class=chat_tokenizer()
        )

    trained = trainer()
    trained.train()
    assert trained.state.global_step == 2
    with pytest.raises(ArtifactError, match=r"chat_template_sha256: cache '[0-9a-f]{16}', config '[0-9a-f]{16}'"):
        trainer(chat_template_path=None)


def test_a_text_cache_refuses_a_trainer_whose_tokenizer_appends_another_eos(tmp_path, teacher):
    """The same vocabulary, but a base tokenizer ends each text with '</s>' and an instruct one with '<|im_end|>'."""
    texts = Dataset.from_dict({"text": ["the cat sat on the mat .", "a bird sang ."] * 4})
    settings = {"assistant_only_loss": False}
    path = tmp_path / "cache"
    TeacherCache.build(
        teacher,
        texts,
        path,
        tokenizer=chat_tokenizer(eos_token="</s>"),
        args=args(tmp_path, **settings),
        temperature=TEMPERATURE,
        k=4,
        progress=False,
    )
    with pytest.raises(ArtifactError, match=re.escape("eos_token: cache '</s>', config '<|im_end|>'")):
        DistillationTrainer(model=tiny_qwen2(1008, seed=5), args=args(tmp_path, teacher_cache=str(path), **settings),
                            processing_class=chat_tokenizer(eos_token="<|im_end|>"))  # fmt: skip


def test_a_cache_of_rows_given_as_they_are_keeps_them_uncut(tmp_path, teacher):
    """dataset_kwargs={'skip_prepare_dataset': True}: SFTTrainer trains on the rows as given (no truncation at
    max_length), and so does the cache; a config that prepares them is refused."""
    ids = [list(range(10, 30)), list(range(40, 52))]
    rows = Dataset.from_dict({"input_ids": ids, "labels": ids})
    skipping = {"max_length": 8, "dataset_kwargs": {"skip_prepare_dataset": True}, "assistant_only_loss": False}
    path = tmp_path / "cache"
    cache = TeacherCache.build(teacher, rows, path, tokenizer=chat_tokenizer(), args=args(tmp_path, **skipping),
                               temperature=TEMPERATURE, k=4, progress=False)  # fmt: skip
    assert cache.dataset["input_ids"] == ids

    def trainer(**settings):
        config = args(tmp_path, teacher_cache=str(path), per_device_train_batch_size=2, **settings)
        return DistillationTrainer(model=tiny_qwen2(1008, seed=5), args=config, train_dataset=rows,
                                   processing_class=chat_tokenizer())  # fmt: skip

    trained = trainer(**skipping)
    trained.train()
    assert trained.state.global_step == 2
    with pytest.raises(ArtifactError, match="skip_prepare_dataset: cache True, config False"):
        trainer(max_length=8, assistant_only_loss=False)
