"""DistillationTrainer on the Trainer's other paths: other architectures' token counts, MoE students,
evaluate / predict, copies of the student, and SFTTrainer's metrics, each against plain dense PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_capgap import DistillationConfig, DistillationTrainer, divergence
from tests.conftest import tiny_llama
from tests.trainer.test_trainer import config, pretrain, teacher_student


def tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size,
            n_embd=24,
            n_layer=1,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
    )


def tiny_mixtral(vocab_size: int) -> MixtralForCausalLM:
    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=vocab_size,
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.5,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


def dense_parts(student, teacher, batch, vocab: int) -> dict[str, torch.Tensor]:
    """Mean forward KL and CE over the labelled next-token positions, from full logits."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = student(**inputs).logits[:, :-1, :vocab].reshape(-1, vocab)
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1, :vocab].reshape(-1, vocab)
    labels = batch["labels"][:, 1:].reshape(-1)
    return {
        "distill": divergence(logits, teacher_logits, labels),
        "ce": F.cross_entropy(logits, labels),
        "logits": logits,
    }


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_logged_loss_and_step_equal_their_dense_parts_for_every_architecture(
    tmp_path, tiny_tokenizer, tiny_text_dataset, architecture
):
    """The Trainer counts shifted labels only for loss_type ForCausalLM (not GPT-2's): the divisor must be
    the labelled positions the loss uses, for the logged loss and for the gradient, with accumulation."""
    vocab = len(tiny_tokenizer)
    torch.manual_seed(0)
    make = tiny_gpt2 if architecture == "gpt2" else (lambda v: tiny_llama(v, hidden=24))
    teacher, student = make(vocab), make(vocab)
    data = tiny_text_dataset.select(range(8))
    initial = copy.deepcopy(student)
    args = config(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tiny_tokenizer
    )
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    parts = dense_parts(initial, teacher, batch, vocab)
    reference = 0.5 * parts["distill"] + 0.5 * parts["ce"]
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["loss"] == pytest.approx(float(reference.detach()), rel=1e-5)
    assert logged["distill_loss"] == pytest.approx(float(parts["distill"]), rel=1e-5, abs=1e-6)  # logged to 6 places
    assert logged["ce_loss"] == pytest.approx(float(parts["ce"]), rel=1e-5, abs=1e-6)
    reference.backward()
    head = initial.get_output_embeddings().weight
    step = student.get_output_embeddings().weight.detach() - head.detach()
    torch.testing.assert_close(step, -head.grad, rtol=1e-4, atol=1e-6)


def test_alpha_zero_trains_on_cross_entropy_without_running_the_teacher(tmp_path, tiny_tokenizer, tiny_text_dataset):
    """alpha weights the distillation term: at alpha = 0 the loss is the LM cross-entropy alone, so the
    teacher never runs (train or eval) and no distill_loss is logged; loss and step equal dense CE."""
    vocab = len(tiny_tokenizer)
    teacher, student = tiny_llama(vocab, hidden=24), tiny_llama(vocab, hidden=24)
    forwards = []
    teacher.register_forward_hook(lambda *_: forwards.append(1))
    data = tiny_text_dataset.select(range(8))
    initial = copy.deepcopy(student)
    args = config(
        tmp_path,
        alpha=0.0,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    assert forwards == []
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    ce = dense_parts(initial, teacher, batch, vocab)["ce"]
    forwards.clear()  # dense_parts ran the teacher
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["loss"] == pytest.approx(float(ce.detach()), rel=1e-5)
    assert logged["ce_loss"] == pytest.approx(float(ce), rel=1e-5, abs=1e-6)
    assert "distill_loss" not in logged
    ce.backward()
    head = initial.get_output_embeddings().weight
    step = student.get_output_embeddings().weight.detach() - head.detach()
    torch.testing.assert_close(step, -head.grad, rtol=1e-4, atol=1e-6)
    metrics = trainer.evaluate()
    assert "eval_ce_loss" in metrics and "eval_distill_loss" not in metrics
    assert forwards == []


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_moe_student_loss_adds_router_aux_loss(tmp_path, tiny_tokenizer, tiny_text_dataset, alpha):
    vocab = len(tiny_tokenizer)
    torch.manual_seed(0)
    teacher, student = tiny_llama(vocab, hidden=24), tiny_mixtral(vocab)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, alpha=alpha),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)(
        [tiny_text_dataset[i] for i in range(6)]
    )
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    parts = dense_parts(student, teacher, batch, vocab)
    aux = student(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
    ).aux_loss
    reference = alpha * parts["distill"] + (1 - alpha) * parts["ce"] + 0.5 * aux
    reference.backward()
    assert float(aux) > 0
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    for grad, param in zip(grads, student.parameters(), strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "field,overrides",
    [("loss_type", {"loss_type": "dft"}), ("label_smoothing_factor", {"label_smoothing_factor": 0.1})],
)
def test_sft_loss_variants_are_refused_naming_the_field(tmp_path, field, overrides):
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **overrides)
    args = config(tmp_path)
    setattr(args, field, overrides[field])  # changed after the config was built
    with pytest.raises(ValueError, match=field):
        DistillationTrainer(model=tiny_llama(), teacher_model=tiny_llama(), args=args)


def test_compute_loss_func_is_refused(tmp_path, tiny_tokenizer, tiny_text_dataset):
    with pytest.raises(ValueError, match="compute_loss_func"):
        DistillationTrainer(
            model=tiny_llama(),
            teacher_model=tiny_llama(),
            args=config(tmp_path),
            train_dataset=tiny_text_dataset,
            processing_class=tiny_tokenizer,
            compute_loss_func=lambda outputs, labels, num_items_in_batch: 0.0,
        )


def test_evaluate_is_the_same_after_predict_and_under_another_prefix(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=tiny_text_dataset,
        eval_dataset=tiny_text_dataset.select(range(8)),
        processing_class=tiny_tokenizer,
    )

    def without_timing(metrics: dict[str, float], prefix: str = "eval") -> dict[str, float]:
        return {k[len(prefix) + 1 :]: v for k, v in metrics.items() if "runtime" not in k and "per_second" not in k}

    first = without_timing(trainer.evaluate())
    assert {"distill_loss", "ce_loss", "entropy", "mean_token_accuracy", "num_tokens"} <= first.keys()
    predicted = trainer.predict(tiny_text_dataset.select(range(8, 16)))
    assert "test_distill_loss" in predicted.metrics
    assert without_timing(trainer.evaluate()) == first
    tested = without_timing(trainer.evaluate(metric_key_prefix="test"), "test")
    assert tested == first
    assert without_timing(trainer.evaluate()) == first


def test_deep_copy_of_the_student_runs_its_own_weights(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    twin = copy.deepcopy(student)
    with torch.no_grad():
        for param in twin.parameters():
            param.zero_()
    ids = torch.tensor([tiny_text_dataset[0]["input_ids"]])
    assert not torch.allclose(twin(input_ids=ids).logits, student(input_ids=ids).logits)
    assert twin(input_ids=ids).logits.abs().max() == 0


def test_sft_metrics_equal_a_dense_computation_in_train_and_eval(tmp_path, tiny_tokenizer, tiny_text_dataset):
    """SFTTrainer's entropy (of the student at T = 1), mean_token_accuracy (argmax == label) over the
    labelled positions, and num_tokens (input tokens trained on so far), from the chunked loss."""
    teacher, student = teacher_student(len(tiny_tokenizer))
    vocab = len(tiny_tokenizer)
    data = tiny_text_dataset.select(range(8))
    pretrain(student, data, DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id), steps=10)
    args = config(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        learning_rate=0.0,
        chunk_size=8,
        temperature=2.0,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    labels = batch["labels"][:, 1:].reshape(-1)
    with torch.no_grad():
        logits = dense_parts(student, teacher, batch, vocab)["logits"][labels != -100]
    labels = labels[labels != -100]
    entropy = float(-(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean())
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    tokens = int(batch["attention_mask"].sum())
    assert 0 < accuracy < 1
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["num_tokens"] for entry in logged] == [tokens, 2 * tokens]
    for entry in logged:
        assert entry["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert entry["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    metrics = trainer.evaluate()
    assert metrics["eval_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["eval_num_tokens"] == 2 * tokens


def test_num_tokens_counts_every_micro_batch_as_sft_trainer(tmp_path, tiny_tokenizer, tiny_text_dataset):
    """As SFTTrainer's, num_tokens is the input tokens of every training micro-batch so far: an evaluation
    between training logs sees the steps not logged yet, and none is counted twice."""
    teacher, student = teacher_student(len(tiny_tokenizer))
    args = config(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        train_sampling_strategy="sequential",
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_text_dataset.select(range(8)),
        eval_dataset=tiny_text_dataset.select(range(4)),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    lengths = [len(trainer.train_dataset[i]["input_ids"]) for i in range(8)]
    evaluated = [entry["eval_num_tokens"] for entry in trainer.state.log_history if "eval_num_tokens" in entry]
    assert evaluated == [sum(lengths[:4]), sum(lengths)]
    assert [entry["num_tokens"] for entry in trainer.state.log_history if "loss" in entry] == [sum(lengths)]


def test_teacher_dtype_leaves_the_callers_teacher_as_it_was(tmp_path, tiny_tokenizer, tiny_text_dataset):
    teacher, student = teacher_student(len(tiny_tokenizer))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, teacher_dtype="bfloat16"),
        train_dataset=tiny_text_dataset,
        processing_class=tiny_tokenizer,
    )
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}


def test_default_config_is_not_refused(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.loss_type == "nll" and args.label_smoothing_factor == 0
