"""DistillationTrainer on the datasets TRL's SFTTrainer takes, with a real-model-like pair.

The pair has what real checkpoints have and toy ones lack: GQA, tied embeddings, padded embedding
rows (teacher 1,024 and student 1,008 rows for a 1,000-token tokenizer) and a chat template.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from hf_capgap import DistillationConfig, DistillationTrainer
from hf_capgap.data import DatasetFormatError, prepare_dataset, rows_holding_positions
from hf_capgap.models import VocabularyMismatchError
from tests.conftest import CHAT_ROWS, CHAT_TEMPLATE, chat_tokenizer, tiny_qwen2

TEACHER_ROWS, STUDENT_ROWS = 1024, 1008
TEXTS = [
    "the cat sat on the mat .",
    "the dog ran to the tree and the cat ran to the mat .",
    "a bird and a cat sang .",
    "the bird sang on the tree .",
    "a cat and a dog sat on a mat and a log .",
    "the dog sat on the log .",
] * 2


def config(tmp_path, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        chunk_size=16,
    )
    settings.update(overrides)
    return DistillationConfig(**settings)


@pytest.fixture()
def pair():
    return tiny_qwen2(TEACHER_ROWS, hidden=32, seed=1), tiny_qwen2(STUDENT_ROWS, hidden=16, seed=2)


def trainer_for(tmp_path, pair, dataset, tokenizer=None, **overrides) -> DistillationTrainer:
    teacher, student = pair
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer or chat_tokenizer(),
    )


def first_batch(trainer: DistillationTrainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def test_messages_with_assistant_only_loss_mask_every_other_token_and_train(tmp_path, pair):
    tokenizer = chat_tokenizer()
    trainer = trainer_for(
        tmp_path, pair, Dataset.from_dict({"messages": CHAT_ROWS}), tokenizer, assistant_only_loss=True
    )
    batch = first_batch(trainer)
    for row, messages in zip(range(4), CHAT_ROWS, strict=False):
        expected = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        length = len(expected["input_ids"])
        assert batch["input_ids"][row, :length].tolist() == expected["input_ids"]
        in_loss = batch["labels"][row, :length] != -100
        assert in_loss.tolist() == [bool(bit) for bit in expected["assistant_masks"]]
        assert (batch["labels"][row, length:] == -100).all()
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["distill_loss"] > 0 and entry["ce_loss"] > 0 for entry in logged)


def test_packed_text_restarts_positions_at_each_document_and_keeps_documents_apart(tmp_path, pair):
    tokenizer = chat_tokenizer()
    trainer = trainer_for(tmp_path, pair, Dataset.from_dict({"text": TEXTS}), tokenizer, packing=True, max_length=32)
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    assert "attention_mask" not in batch  # padding-free: documents are told apart by position_ids
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) == len(row["seq_lengths"]) > 1
    assert all(batch["labels"][0, start] == -100 for start in starts)  # no document predicts another's first token
    # The packed row gives each document exactly the logits it gets alone: no attention across documents.
    teacher = pair[0]
    with torch.no_grad():
        packed = teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        ends = [*starts[1:], len(positions)]
        for start, end in zip(starts, ends, strict=True):
            alone = teacher(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-5)
    trainer.train()


def test_packed_batches_reach_the_teacher_with_their_positions(tmp_path, pair):
    """The online teacher's signal for a packed row equals the one for each document alone."""
    tokenizer = chat_tokenizer()
    packed = trainer_for(tmp_path, pair, Dataset.from_dict({"text": TEXTS}), tokenizer, packing=True, max_length=32)
    batch = packed.data_collator([packed.train_dataset[0]])
    loss_packed = packed.compute_loss(pair[1], dict(batch))
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
    documents = [
        batch["input_ids"][0, s:e].tolist()
        for s, e in zip(starts, [*starts[1:], batch["input_ids"].shape[1]], strict=True)
    ]
    plain = trainer_for(tmp_path, pair, Dataset.from_dict({"input_ids": documents}), tokenizer)
    separate = plain.data_collator([{"input_ids": ids} for ids in documents])
    torch.testing.assert_close(loss_packed, plain.compute_loss(pair[1], dict(separate)), rtol=1e-4, atol=1e-5)


def test_prompt_completion_masks_the_prompt(tmp_path, pair):
    tokenizer = chat_tokenizer()
    rows = {
        "prompt": ["the cat", "a bird and", "the dog ran to"],
        "completion": [" sat on the mat .", " a cat sang .", " the tree ."],
    }
    trainer = trainer_for(tmp_path, pair, Dataset.from_dict(rows), tokenizer, completion_only_loss=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for row, prompt in enumerate(rows["prompt"]):
        prompt_length = len(tokenizer(prompt)["input_ids"])
        assert (batch["labels"][row, :prompt_length] == -100).all()
        assert (batch["labels"][row, prompt_length:] != -100).sum() > 0
    trainer.train()


def test_base_and_instruct_tokenizers_share_a_vocabulary_but_a_swapped_id_is_refused(tmp_path, pair):
    student_tokenizer = chat_tokenizer(eos_token="</s>", chat_template=None)  # a base model's
    instruct = chat_tokenizer(eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    instruct.padding_side, instruct.model_max_length = "left", 4096
    teacher, student = pair
    data = Dataset.from_dict({"text": TEXTS})
    DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=data,
        processing_class=student_tokenizer,
        teacher_processing_class=instruct,
    )
    with pytest.raises(VocabularyMismatchError, match=r"id 7: student .* vs teacher"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path),
            train_dataset=data,
            processing_class=student_tokenizer,
            teacher_processing_class=chat_tokenizer(swap=(7, 8)),
        )


def test_predict_returns_logits_and_evaluate_feeds_compute_metrics(tmp_path, pair):
    tokenizer = chat_tokenizer()
    seen = {}

    def metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"rows": float(prediction.predictions.shape[0])}

    teacher, student = pair
    data = Dataset.from_dict({"text": TEXTS})
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        compute_metrics=metrics,
    )
    prediction = trainer.predict(trainer.eval_dataset)
    longest = max(len(row["input_ids"]) for row in trainer.eval_dataset)
    assert prediction.predictions.shape == (len(TEXTS), longest, STUDENT_ROWS)
    result = trainer.evaluate()
    assert result["eval_rows"] == len(TEXTS) and seen["shape"][-1] == STUDENT_ROWS
    assert {"eval_loss", "eval_distill_loss", "eval_ce_loss"} <= result.keys()


def test_a_fully_masked_micro_batch_gives_zero_loss_and_zero_gradients(tmp_path, pair):
    tokenizer = chat_tokenizer()
    trainer = trainer_for(tmp_path, pair, Dataset.from_dict({"text": TEXTS}), tokenizer)
    student = pair[1]
    ids = torch.randint(10, 900, (2, 7))
    student.zero_grad()
    loss = trainer.compute_loss(
        student, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    )
    loss.backward()
    assert float(loss.detach()) == 0.0
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # every parameter gets a (zero) gradient: DDP steps
    trainer.log({"loss": 0.0})
    assert trainer.state.log_history[-1]["empty_micro_batches"] == 1


def test_a_dataset_without_any_labelled_token_fails_before_training(tmp_path, pair):
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[5, -100, -100], [-100, -100]]})
    with pytest.raises(ValueError, match="no row of train_dataset has a token to predict"):
        trainer_for(tmp_path, pair, rows, max_length=None)


@pytest.mark.parametrize(
    "rows,tokenizer_kwargs,overrides,message",
    [
        ({"body": ["the cat"]}, {}, {}, r"columns \['body'\].*dataset_text_field"),
        ({"messages": CHAT_ROWS[:2]}, {"chat_template": None}, {}, "no chat template"),
        ({"text": TEXTS}, {}, {"assistant_only_loss": True}, "assistant_only_loss=True needs a conversational"),
        (
            {"messages": CHAT_ROWS[:2]},
            {"chat_template": CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")},
            {"assistant_only_loss": True},
            "generation",
        ),
    ],
)
def test_unusable_datasets_fail_before_any_model_runs(tmp_path, pair, rows, tokenizer_kwargs, overrides, message):
    with pytest.raises(DatasetFormatError, match=message):
        trainer_for(tmp_path, pair, Dataset.from_dict(rows), chat_tokenizer(**tokenizer_kwargs), **overrides)


def test_prepare_dataset_gives_the_trainers_rows(tmp_path, pair):
    """The teacher cache prepares rows with prepare_dataset: they must be the rows the trainer trains on."""
    tokenizer = chat_tokenizer()
    data = Dataset.from_dict({"messages": CHAT_ROWS})
    trainer = trainer_for(tmp_path, pair, data, tokenizer, assistant_only_loss=True)
    prepared = prepare_dataset(data, tokenizer, trainer.args)
    assert prepared[:] == trainer.train_dataset[:]


def test_a_streamed_text_dataset_is_packed_on_the_fly_and_trains(tmp_path, pair):
    from datasets import IterableDataset

    def documents():
        for text in TEXTS:
            yield {"text": text}

    trainer = trainer_for(tmp_path, pair, IterableDataset.from_generator(documents), packing=True, max_length=16)
    trainer.train()
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]


def test_the_liger_backend_is_refused_with_the_fix_when_it_cannot_run(tmp_path, pair):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available():
        pytest.skip("Liger can run here")
    with pytest.raises((ImportError, ValueError), match="loss_backend='hf_capgap'"):
        trainer_for(tmp_path, pair, Dataset.from_dict({"text": TEXTS}), loss_backend="liger")
    with pytest.raises(ValueError, match="loss_backend"):
        config(tmp_path, loss_backend="triton")


def test_rows_holding_positions_counts_labels_past_the_first_token():
    """Labelled positions per row: 0, 0, 7 (labels after position 0 that are not -100); rows without a
    labels column: every position after the first (4 per row of 5 tokens). Read in batches of 2 rows."""
    labelled = Dataset.from_dict(
        {"input_ids": [[5] * 8] * 3, "labels": [[5] + [-100] * 7, [-100] * 8, [-100] + [5] * 7]}
    )
    assert [rows_holding_positions(labelled, n, batch_rows=2) for n in (1, 7, 8)] == [3, 3, 3]
    unlabelled = Dataset.from_dict({"input_ids": [[5] * 5] * 4})
    assert [rows_holding_positions(unlabelled, n, batch_rows=2) for n in (1, 4, 5, 16, 100)] == [1, 1, 2, 4, 4]


def test_a_formatting_func_makes_text_of_rows_without_a_text_column(tmp_path, pair):
    """As in SFTTrainer, ``formatting_func`` turns any row into the text trained on, for the train and
    the eval set alike, so the up-front format check takes the rows it formats."""
    tokenizer = chat_tokenizer()
    rows = Dataset.from_dict({"q": TEXTS[:6], "a": TEXTS[6:]})

    def formatting_func(row: dict) -> str:
        return f"{row['q']} {row['a']}"

    trained = DistillationTrainer(
        model=pair[1],
        teacher_model=pair[0],
        args=config(tmp_path, max_steps=1),
        train_dataset=rows,
        eval_dataset={"qa": rows},
        processing_class=tokenizer,
        formatting_func=formatting_func,
    )
    text = tokenizer(formatting_func(rows[0]))["input_ids"]
    assert trained.train_dataset[0]["input_ids"][: len(text)] == text
    assert trained.eval_dataset["qa"][0]["input_ids"] == trained.train_dataset[0]["input_ids"]
    trained.train()
    assert trained.evaluate()["eval_qa_ce_loss"] > 0
