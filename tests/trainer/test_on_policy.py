"""On-policy distillation (lmbda, seq_kd) in DistillationTrainer, on tiny Qwen2 models with padded embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from hf_capgap import DistillationConfig, DistillationTrainer
from hf_capgap.data import DatasetFormatError
from hf_capgap.errors import ConfigError
from hf_capgap.trainer.on_policy import draw_on_policy
from tests.conftest import CHAT_ROWS, CHAT_VOCAB_SIZE, chat_tokenizer, tiny_qwen2

PROMPTS = [{"prompt": messages[:-1]} for messages in CHAT_ROWS]
ON_POLICY_LOGS = ("on_policy_share", "completion_length", "generation_time_share")


def config(tmp_path, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_completion_length=5,
        train_sampling_strategy="sequential",
    )
    settings.update(overrides)
    return DistillationConfig(**settings)


def models():
    return tiny_qwen2(1024, hidden=32, seed=1), tiny_qwen2(1008, hidden=16, seed=2)


class Recording(DistillationTrainer):
    """Keeps every training micro-batch the loss sees."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen = [*getattr(self, "seen", []), {k: v.clone() for k, v in inputs.items()}]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def count_generate(model, calls: list):
    """Record, for each generate call on ``model``, whether it ran in training mode and with gradient checkpointing."""
    generate = model.generate

    def recorded(*args, **kwargs):
        calls.append((model.training, model.is_gradient_checkpointing, torch.is_grad_enabled()))
        return generate(*args, **kwargs)

    model.generate = recorded


def train_logs(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_lmbda_1_on_chat_prompts_samples_from_the_student_and_takes_loss_on_its_completions(tmp_path):
    tokenizer = chat_tokenizer()
    teacher, student = models()
    student.config.attention_dropout = 0.1
    student_calls, teacher_calls = [], []
    count_generate(student, student_calls)
    count_generate(teacher, teacher_calls)
    args = config(tmp_path, lmbda=1.0, loss="reverse_kl", gradient_checkpointing=True)
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=tokenizer,
    )
    logs = train_logs(trainer)
    assert [entry["on_policy_share"] for entry in logs] == [1.0, 1.0]
    assert all(0 < entry["completion_length"] <= 5 and 0 < entry["generation_time_share"] < 1 for entry in logs)
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    # Sampled in eval mode (dropout off), without gradients or checkpointing; trained with both afterwards.
    assert student_calls == [(False, False, False)] * 2 and teacher_calls == []
    assert student.training and student.is_gradient_checkpointing
    eos = tokenizer.eos_token_id
    for micro, batch in enumerate(trainer.seen):
        for row in range(4):
            messages = PROMPTS[4 * micro + row]["prompt"]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
            ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
            n = len(prompt)
            assert ids[:n].tolist() == prompt and (labels[:n] == -100).all()  # the prompt, outside the loss
            completion = labels[n:][labels[n:] != -100]
            assert 1 <= len(completion) <= 5 and completion.tolist() == ids[n : n + len(completion)].tolist()
            assert int(mask.sum()) == n + len(completion)  # nothing after the completion is attended or scored
            assert (completion < CHAT_VOCAB_SIZE).all()  # never a padded embedding row
            assert eos not in completion[:-1].tolist()  # cut at the first EOS


def test_seq_kd_samples_the_completions_from_the_teacher(tmp_path):
    teacher, student = models()
    student_calls, teacher_calls = [], []
    count_generate(student, student_calls)
    count_generate(teacher, teacher_calls)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, seq_kd=True, max_steps=1),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=chat_tokenizer(),
    )
    (log,) = train_logs(trainer)
    assert log["on_policy_share"] == 0.0 and log["completion_length"] > 0
    assert student_calls == [] and len(teacher_calls) == 1


def test_lmbda_0_is_the_off_policy_trainer(tmp_path):
    """No generation, no prompt lengths, no on-policy logs; the sampling settings change nothing."""
    rows = [{"prompt": messages[:-1], "completion": messages[-1:]} for messages in CHAT_ROWS]
    runs = []
    for settings in ({}, {"max_completion_length": 3, "sampling_temperature": 0.5, "top_k": 2, "top_p": 0.5}):
        teacher, student = models()
        calls = []
        count_generate(student, calls)
        trainer = Recording(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, **settings),
            train_dataset=Dataset.from_list(rows),
            processing_class=chat_tokenizer(),
        )
        logs = train_logs(trainer)
        assert calls == [] and trainer.on_policy is None
        assert not any(name in entry for entry in logs for name in ON_POLICY_LOGS)
        assert all(set(batch) == {"input_ids", "attention_mask", "labels"} for batch in trainer.seen)
        runs.append(([entry["loss"] for entry in logs], trainer.seen))
    assert runs[0][0] == runs[1][0]
    for first, second in zip(runs[0][1], runs[1][1], strict=True):
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_lmbda_draws_are_seeded_by_step_and_micro_step_and_continue_on_resume(tmp_path):
    """lmbda=0.5 over 4 steps of 2 micro-batches: the logged share is the seeded draws', and a run resumed from
    step 2 draws and samples as the uninterrupted one (same shares, same losses)."""
    rows = [{"prompt": messages[:-1], "completion": messages[-1:]} for messages in CHAT_ROWS]
    settings = dict(lmbda=0.5, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2)

    def run(resume=None):
        teacher, student = models()
        args = config(tmp_path, save_strategy="steps", save_steps=2, **settings)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=chat_tokenizer(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}

    whole = run()
    draws = {step: [draw_on_policy(0, step - 1, micro, 0.5) for micro in (0, 1)] for step in whole}
    assert {step: entry["on_policy_share"] for step, entry in whole.items()} == {
        step: sum(drawn) / 2 for step, drawn in draws.items()
    }
    assert len({entry["on_policy_share"] for entry in whole.values()}) > 1  # both kinds occur
    resumed = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1 and 2 restored from the checkpoint's trainer state
    for step in (3, 4):
        assert resumed[step]["on_policy_share"] == whole[step]["on_policy_share"]
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5)


def test_draws_are_independent_of_the_global_rng():
    torch.manual_seed(1)
    first = [draw_on_policy(3, step, micro, 0.3) for step in range(20) for micro in range(2)]
    torch.manual_seed(2)
    assert first == [draw_on_policy(3, step, micro, 0.3) for step in range(20) for micro in range(2)]
    assert 0 < sum(first) < len(first)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"lmbda": 1.5}, "lmbda"),
        ({"lmbda": 0.5, "max_completion_length": 0}, "max_completion_length"),
        ({"lmbda": 0.5, "sampling_temperature": 0.0}, "sampling_temperature"),
        ({"lmbda": 0.5, "top_k": -1}, "top_k"),
        ({"lmbda": 0.5, "top_p": 0.0}, "top_p"),
        ({"lmbda": 0.5, "teacher_cache": "/nonexistent"}, "teacher_cache"),
        ({"seq_kd": True, "teacher_cache": "/nonexistent"}, "teacher_cache"),
        ({"lmbda": 1.0, "packing": True, "max_length": 32}, "packing"),
        ({"lmbda": 1.0, "padding_free": True, "max_length": None}, "padding_free"),
    ],
)
def test_config_refusals_name_the_field(tmp_path, settings, field):
    with pytest.raises(ConfigError, match=field):
        config(tmp_path, **settings)


@pytest.mark.parametrize(
    ("rows", "settings", "tokenizer_settings", "match"),
    [
        ([{"text": "the cat sat"}] * 4, {"lmbda": 1.0}, {}, "needs prompts"),
        ([{"messages": CHAT_ROWS[0]}] * 4, {"lmbda": 0.5}, {}, "needs prompts"),
        ([{"input_ids": [5, 6, 7]}] * 4, {"seq_kd": True}, {}, "completion_mask"),
        (PROMPTS, {"lmbda": 0.5}, {}, "prompt-only rows with lmbda=0.5"),
        (PROMPTS, {"lmbda": 1.0}, {"chat_template": None}, "no chat template"),
        ([{"prompt": "the cat", "completion": "sat"}] * 4, {"lmbda": 1.0, "formatting_func": True}, {}, "formatting"),
    ],
)
def test_dataset_refusals_fire_before_any_model_runs(tmp_path, rows, settings, tokenizer_settings, match):
    teacher, student = models()
    forwards = []
    for model in (teacher, student):
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
    settings = dict(settings)
    formatting = settings.pop("formatting_func", False)
    formatting_func = (lambda row: row["prompt"] + row["completion"]) if formatting else None
    with pytest.raises((ConfigError, DatasetFormatError), match=match):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, **settings),
            train_dataset=Dataset.from_list(rows),
            processing_class=chat_tokenizer(**tokenizer_settings),
            formatting_func=formatting_func,
        )
    assert forwards == []


def test_plain_prompts_with_lmbda_accept_what_lmbda_0_accepts(tmp_path):
    """Plain prompt-completion rows with completion_only_loss=False (the prompt boundary comes from TRL's
    completion_mask, kept for the collator) and pre-tokenized rows with a completion_mask both train on-policy."""
    tokenizer = chat_tokenizer()
    plain = [{"prompt": "the cat sat on ", "completion": "the mat ."}] * 4
    tokenized = [{"input_ids": [20, 21, 22, 23, 24], "completion_mask": [0, 0, 0, 1, 1]}] * 4
    for rows, settings in ((plain, {"completion_only_loss": False}), (tokenized, {})):
        teacher, student = models()
        trainer = Recording(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, lmbda=1.0, max_steps=1, **settings),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        (log,) = train_logs(trainer)
        assert log["on_policy_share"] == 1.0
        prompt = tokenizer(plain[0]["prompt"])["input_ids"] if rows is plain else [20, 21, 22]
        (batch,) = trainer.seen
        assert batch["input_ids"][:, : len(prompt)].tolist() == [prompt] * 4
        assert (batch["labels"][:, : len(prompt)] == -100).all() and (batch["labels"][:, len(prompt)] != -100).all()


def test_a_peft_student_generates_and_trains_its_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    teacher, student = models()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8, task_type="CAUSAL_LM")
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, lmbda=1.0, max_steps=1, learning_rate=1e-2),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=chat_tokenizer(),
        peft_config=lora,
    )
    assert isinstance(trainer.model, peft.PeftModel)
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    (log,) = train_logs(trainer)
    assert log["on_policy_share"] == 1.0 and math.isfinite(log["loss"])
    changed = [not torch.equal(p, adapters[n]) for n, p in trainer.model.named_parameters() if n in adapters]
    assert changed and all(changed)


def polluted(model):
    """A generation_config as Hub models ship one: none of it may reach on-policy sampling."""
    config = model.generation_config
    config.suppress_tokens = list(range(6, 990))
    config.repetition_penalty = 5.0
    config.min_new_tokens = 4
    config.bad_words_ids = [[7], [8]]
    config.forced_eos_token_id = 3
    config.num_return_sequences = 2
    return model


@pytest.mark.parametrize("settings", [{"lmbda": 1.0}, {"seq_kd": True}], ids=["student", "teacher"])
def test_sampling_ignores_the_models_own_generation_config(tmp_path, settings):
    """The samples are those of a model with a bare generation_config (the same seed draws the same tokens), and
    the model's own config is back after sampling."""
    seen = []
    for pollute in (False, True):
        teacher, student = models()
        if pollute:
            polluted(teacher if settings.get("seq_kd") else student)
        trainer = Recording(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, max_steps=1, **settings),
            train_dataset=Dataset.from_list(PROMPTS),
            processing_class=chat_tokenizer(),
        )
        trainer.train()
        seen.append(trainer.seen[0])
    assert all(torch.equal(seen[0][key], seen[1][key]) for key in ("input_ids", "labels", "attention_mask"))
    sampler = teacher if settings.get("seq_kd") else student
    assert sampler.generation_config.num_return_sequences == 2 and sampler.generation_config.min_new_tokens == 4


def reference_reverse_kl(batch) -> tuple[float, float]:
    """Dense reverse KL(student || teacher) over the labelled positions of ``batch``, per token, from fresh copies
    of the models, and the norm of its gradient on the student's parameters."""
    teacher, student = models()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    log_q = torch.log_softmax(student(**inputs).logits[:, :-1, :CHAT_VOCAB_SIZE], dim=-1)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(**inputs).logits[:, :-1, :CHAT_VOCAB_SIZE], dim=-1)
    scored = batch["labels"][:, 1:] != -100
    loss = (log_q.exp() * (log_q - log_p)).sum(-1)[scored].sum() / scored.sum()
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in student.parameters() if p.grad is not None))
    return loss.item(), norm.item()


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_student_sampled_micro_batches_are_scored_by_the_divergence_alone(tmp_path, alpha):
    """No cross-entropy on the student's own samples (GKD has none): whatever alpha, the loss and its gradient are
    the dense reverse KL on the sampled completions, the teacher runs, and no ce_loss is logged."""
    teacher, student = models()
    teacher_forwards = []
    teacher.register_forward_pre_hook(lambda *_: teacher_forwards.append(1))
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, lmbda=1.0, loss="reverse_kl", alpha=alpha, max_steps=1, max_grad_norm=1e9),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=chat_tokenizer(),
    )
    (log,) = train_logs(trainer)
    loss, norm = reference_reverse_kl(trainer.seen[0])
    assert log["loss"] == pytest.approx(loss, abs=1e-4) and log["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert log["distill_loss"] == pytest.approx(loss, rel=1e-4) and "ce_loss" not in log
    assert len(teacher_forwards) == 1


def test_teacher_sampled_micro_batches_keep_alpha_and_cross_entropy(tmp_path):
    teacher, student = models()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, seq_kd=True, alpha=0.5, max_steps=1),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=chat_tokenizer(),
    )
    (log,) = train_logs(trainer)
    assert log["loss"] == pytest.approx(0.5 * log["distill_loss"] + 0.5 * log["ce_loss"], abs=2e-4)


def test_prompts_are_read_from_the_rows_whatever_side_the_collator_pads(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    tokenizer = chat_tokenizer()
    tokenizer.padding_side = "left"
    rows = [
        {"input_ids": [20, 21, 22, 23, 24, 25, 26], "labels": [-100] * 5 + [25, 26]},
        {"input_ids": [30, 31, 32], "labels": [-100, -100, 32]},
    ] * 2
    teacher, student = models()
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, lmbda=1.0, max_steps=1),
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    (batch,) = trainer.seen
    for row, prompt in enumerate([[20, 21, 22, 23, 24], [30, 31]] * 2):
        assert batch["input_ids"][row, : len(prompt)].tolist() == prompt
        assert (batch["labels"][row, : len(prompt)] == -100).all() and batch["labels"][row, len(prompt)] != -100


@pytest.mark.parametrize(
    ("rows", "settings", "match"),
    [
        (  # assistant-only labels of a multi-turn conversation: two labelled spans
            [{"input_ids": [20, 21, 22, 23, 24, 25, 26], "labels": [-100, -100, 22, 23, -100, 25, 26]}] * 4,
            {"lmbda": 1.0},
            "row 0 .* more than one span.*prompt / completion rows",
        ),
        (  # one row without a prompt token, far into the dataset
            [{"input_ids": [20, 21, 22, 23, 24], "completion_mask": [0, 0, 0, 1, 1]}] * 14
            + [{"input_ids": [20, 21, 22, 23, 24], "completion_mask": [1, 1, 1, 1, 1]}],
            {"lmbda": 0.01},
            "row 14 has no prompt token",
        ),
        (  # a prompt that fills max_length: no room to generate
            [{"prompt": "the cat sat on the mat and the dog"}] * 4,
            {"lmbda": 1.0, "max_length": 5, "completion_only_loss": False},
            "row 0 .* max_length=5.*Raise max_length or shorten",
        ),
    ],
    ids=["multi_turn_labels", "prompt_less_row", "no_room"],
)
def test_rows_generation_cannot_use_are_refused_at_init(tmp_path, rows, settings, match):
    teacher, student = models()
    forwards = []
    for model in (teacher, student):
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
    with pytest.raises(ConfigError, match=match):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, **settings),
            train_dataset=Dataset.from_list(rows),
            processing_class=chat_tokenizer(),
        )
    assert forwards == []


def test_completions_are_capped_so_rows_fit_max_length(tmp_path):
    """Each micro-batch generates at most max_length - its longest prompt tokens."""
    words = "the cat sat on the mat and the dog ran to the tree".split()
    rows = [{"prompt": " ".join(words[:n])} for n in (2, 5, 9, 10, 3, 1, 7, 4)]
    teacher, student = models()
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, lmbda=1.0, max_length=12, max_completion_length=6),
        train_dataset=Dataset.from_list(rows),
        processing_class=chat_tokenizer(),
    )
    trainer.train()
    for batch in trainer.seen:
        prompts = (batch["labels"] == -100).long().argmin(dim=1)
        assert int(batch["attention_mask"].sum(dim=1).max()) <= 12
        assert int((batch["labels"] != -100).sum(dim=1).max()) <= min(6, 12 - int(prompts.max()))


def test_assistant_only_loss_accepts_chat_prompts_whatever_the_generation_span_holds(tmp_path):
    """A template whose {% generation %} span holds the content only (end of turn outside): prompt-only rows
    train with assistant_only_loss, from their exact prompts (their completion is generated anyway)."""
    from tests.conftest import CHAT_TEMPLATE

    content_only = CHAT_TEMPLATE.replace(
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    assert content_only != CHAT_TEMPLATE
    tokenizer = chat_tokenizer(chat_template=content_only)
    teacher, student = models()
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, lmbda=1.0, max_steps=1, assistant_only_loss=True),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=tokenizer,
    )
    (log,) = train_logs(trainer)
    assert log["on_policy_share"] == 1.0
    (batch,) = trainer.seen
    for row in range(4):
        prompt = tokenizer.apply_chat_template(PROMPTS[row]["prompt"], add_generation_prompt=True, return_dict=True)
        prompt = prompt["input_ids"]
        assert batch["input_ids"][row, : len(prompt)].tolist() == prompt
        assert (batch["labels"][row, : len(prompt)] == -100).all() and batch["labels"][row, len(prompt)] != -100


def test_a_prompt_only_eval_dataset_is_told_evaluation_needs_completions(tmp_path):
    teacher, student = models()
    with pytest.raises(ConfigError, match="eval_dataset.*scores the dataset's completions.*'completion'"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path, lmbda=1.0),
            train_dataset=Dataset.from_list(PROMPTS),
            eval_dataset=Dataset.from_list(PROMPTS),
            processing_class=chat_tokenizer(),
        )


class ForceTokenAtSecondStep:
    """A logits processor standing in for the sampling model choosing ``token`` as its second token."""

    def __init__(self, token: int) -> None:
        self.token, self.start = token, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        if input_ids.shape[1] == self.start + 1:
            scores[:] = -1e9
            scores[:, self.token] = 0
        return scores


def test_seq_kd_samples_stop_at_the_teachers_own_end_of_turn(tmp_path):
    teacher, student = models()
    teacher.generation_config.eos_token_id = [4, 5]  # an instruct teacher's extra end-of-turn id (4)
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, seq_kd=True, max_steps=1, max_completion_length=6),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=chat_tokenizer(),
    )
    trainer.on_policy.processors.append(ForceTokenAtSecondStep(4))
    trainer.train()
    labels = trainer.seen[0]["labels"]
    completions = [row[row != -100].tolist() for row in labels]
    assert all(len(tokens) == 2 and tokens[1] == 4 for tokens in completions), completions
    assert teacher.generation_config.eos_token_id == [4, 5]


def test_accuracy_and_entropy_are_not_read_on_the_students_own_samples(tmp_path):
    teacher, student = models()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, lmbda=1.0, max_steps=1),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=chat_tokenizer(),
    )
    (log,) = train_logs(trainer)
    assert log["on_policy_share"] == 1.0 and math.isfinite(log["distill_loss"])
    assert "mean_token_accuracy" not in log and "entropy" not in log


def test_gradient_checkpointing_comes_back_after_an_exception_inside_generate(tmp_path):
    teacher, student = models()

    class OutOfMemory:
        def __call__(self, input_ids, scores):
            raise RuntimeError("out of memory (simulated)")

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, lmbda=1.0, max_steps=1, gradient_checkpointing=True),
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=chat_tokenizer(),
    )
    trainer.on_policy.processors.append(OutOfMemory())
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    assert student.is_gradient_checkpointing
