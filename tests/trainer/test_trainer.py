"""DistillationTrainer end to end on tiny LLaMA models built from scratch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_capgap import DistillationConfig, DistillationTrainer, divergence
from tests.conftest import tiny_llama


def config(tmp_path, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        max_steps=6,
        logging_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        chunk_size=16,
    )
    settings.update(overrides)
    return DistillationConfig(**settings)


def teacher_student(vocab_size: int):
    torch.manual_seed(0)
    return tiny_llama(vocab_size, hidden=48, layers=2), tiny_llama(vocab_size, hidden=24, layers=1)


def pretrain(model, dataset, collator, steps: int = 40):
    """A few plain LM steps so the teacher has something to teach."""
    batch = collator([dataset[i] for i in range(len(dataset))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def mean_kl(student, teacher, dataset, collator) -> float:
    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return float(divergence(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), labels.reshape(-1)))


def test_student_kl_to_teacher_goes_down_and_saved_student_reloads(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    collator = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)
    pretrain(teacher, tiny_text_dataset, collator)
    before = mean_kl(student, teacher, tiny_text_dataset, collator)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=30, alpha=0.9, logging_steps=10),
        train_dataset=tiny_text_dataset,
        eval_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    after = mean_kl(student, teacher, tiny_text_dataset, collator)
    assert after < 0.7 * before
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"distill_loss", "ce_loss"} <= logged[0].keys()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_distill_loss", "eval_ce_loss"} <= metrics.keys()
    assert metrics["eval_loss"] == pytest.approx(
        0.9 * metrics["eval_distill_loss"] + 0.1 * metrics["eval_ce_loss"], rel=1e-3
    )

    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    batch = collator([tiny_text_dataset[0]])
    torch.testing.assert_close(
        reloaded(input_ids=batch["input_ids"]).logits, student(input_ids=batch["input_ids"]).logits
    )
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_loss_matches_reference_on_fused_and_logits_paths(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    collator = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)
    batch = collator([tiny_text_dataset[i] for i in range(6)])
    losses = {}
    for mode in ("always", "never"):
        args = config(tmp_path, loss="jsd", beta=0.3, temperature=2.0, alpha=0.7, fused_lm_head=mode)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=tiny_text_dataset,
            processing_class=tiny_tokenizer,
        )
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        losses[mode] = (loss.detach(), student.lm_head.weight.grad.clone())
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    reference = 0.7 * divergence(flat, teacher_logits.reshape(flat.shape), labels, "jsd", 0.3, 2.0) + 0.3 * (
        torch.nn.functional.cross_entropy(flat, labels)
    )
    student.zero_grad()
    reference.backward()
    for loss, grad in losses.values():
        torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, student.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_tokenizer, tiny_text_dataset):
    """8 variable-length rows in one batch == 4 micro-batches of 2, through the real Trainer loop."""
    data = tiny_text_dataset.select(range(8))
    results = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        teacher, student = teacher_student(len(tiny_tokenizer))
        args = config(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            train_sampling_strategy="sequential",
        )
        initial = student.lm_head.weight.detach().clone()
        DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tiny_tokenizer
        ).train()
        results.append(student.lm_head.weight.detach() - initial)
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-7)


def test_resume_from_checkpoint_continues(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    first.train()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    first_step3 = next(entry for entry in first.state.log_history if entry.get("step") == 3 and "loss" in entry)
    teacher, student = teacher_student(len(tiny_tokenizer))
    resumed = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=6, save_strategy="steps", save_steps=2),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.state.global_step == 6
    logged = [entry for entry in resumed.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [3, 6]
    assert logged[0] == first_step3  # restored from the checkpoint, not retrained


def test_peft_student_trains_only_adapters(tmp_path, tiny_tokenizer, tiny_text_dataset):
    from peft import LoraConfig

    teacher, student = teacher_student(len(tiny_tokenizer))
    base_weight = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=3),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8),
    )
    trainer.train()
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    torch.testing.assert_close(
        trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, base_weight
    )


def test_vocab_checks(tmp_path, tiny_tokenizer, tiny_text_dataset):
    vocab = len(tiny_tokenizer)
    teacher, student = tiny_llama(vocab + 8), tiny_llama(vocab)
    with pytest.raises(ValueError, match="processing_class is required"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=tiny_text_dataset
        )
    # Padding only: compared on the tokenizer's real vocabulary.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    assert trainer.loss_spec.vocab_size == vocab
    with pytest.raises(ValueError, match="tokenizer"):
        DistillationTrainer(
            model=tiny_llama(vocab - 2),
            teacher_model=teacher,
            args=config(tmp_path),
            train_dataset=tiny_text_dataset,
            processing_class=tiny_tokenizer,
        )


def test_missing_labels_fail_clearly(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    with pytest.raises(ValueError, match="'labels'"):
        trainer.compute_loss(student, {"input_ids": torch.randint(0, len(tiny_tokenizer), (2, 6))})


def test_missing_teacher_and_wrong_args_fail_before_training(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="teacher_model is required"):
        DistillationTrainer(model=tiny_llama(), args=config(tmp_path), processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="DistillationConfig"):
        DistillationTrainer(model=tiny_llama(), teacher_model=tiny_llama())


@pytest.mark.parametrize(
    "field,value",
    [
        ("loss", "kl"),
        ("temperature", 0.0),
        ("alpha", -0.1),
        ("beta", 1.0),
        ("chunk_size", 0),
        ("teacher_dtype", "int8"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(tmp_path, field, value):
    overrides = {field: value}
    if field == "beta":
        overrides["loss"] = "jsd"
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **overrides)


def test_teacher_dtype_is_applied(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, teacher_dtype="bfloat16"),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32
