"""loss='taid' in DistillationTrainer: the schedule of t once per optimizer step against a plain
re-implementation of the paper's update, logged as taid_t, continued exactly after a resume, and the
teacher-cache modes that cannot serve it refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from hf_capgap import DistillationConfig, DistillationTrainer, TeacherCache
from hf_capgap.errors import ConfigError
from hf_capgap.trainer.settings import check_cache_serves_loss
from tests.conftest import tiny_llama

SCHEDULE = {"taid_t_start": 0.3, "taid_t_end": 0.95, "taid_alpha": 0.6, "taid_beta": 0.5}


def config(tmp_path, **overrides) -> DistillationConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-3, max_steps=6, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, chunk_size=16, loss="taid", alpha=0.8, temperature=1.5, **SCHEDULE,
    )  # fmt: skip
    settings.update(overrides)
    return DistillationConfig(**settings)


def trainer_for(args, tokenizer, dataset) -> DistillationTrainer:
    torch.manual_seed(0)
    teacher, student = tiny_llama(len(tokenizer), hidden=48, layers=2), tiny_llama(len(tokenizer), hidden=24, layers=1)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def plain_schedule(objectives: list[float], max_steps: int) -> list[float]:
    """t after each optimizer step, written from the paper's Algorithm 1 and the authors' code."""
    t, momentum, previous, history = SCHEDULE["taid_t_start"], 0.0, None, []
    for step, objective in enumerate(objectives):
        if previous is not None:
            change = (previous - objective) / (previous + 1e-15)
            momentum = SCHEDULE["taid_beta"] * momentum + (1 - SCHEDULE["taid_beta"]) * change
            linear = SCHEDULE["taid_t_start"] + (SCHEDULE["taid_t_end"] - SCHEDULE["taid_t_start"]) * step / max_steps
            adaptive = t + SCHEDULE["taid_alpha"] / (1 + math.exp(-momentum)) * (1 - t)
            t = min(SCHEDULE["taid_t_end"], max(linear, adaptive))
        previous = objective
        history.append(t)
    return history


def test_schedule_moves_once_per_optimizer_step_as_the_paper_says(tmp_path, tiny_tokenizer, tiny_text_dataset):
    trainer = trainer_for(config(tmp_path), tiny_tokenizer, tiny_text_dataset)
    schedule = trainer.taid_schedule
    recorded, used = [], []
    record = schedule.record

    def spy(distill_sum, num_tokens):  # each micro-batch's sum, and the t its loss was computed at
        recorded.append((float(distill_sum), num_tokens))
        used.append(schedule.t)
        record(distill_sum, num_tokens)

    schedule.record = spy
    trainer.train()
    assert len(recorded) == 6 * 2  # two micro-batches per optimizer step
    steps = [recorded[i : i + 2] for i in range(0, len(recorded), 2)]
    objectives = [sum(s for s, _ in step) / sum(n for _, n in step) for step in steps]
    want = plain_schedule(objectives, max_steps=6)
    logged = [entry["taid_t"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(want, abs=1e-6)
    assert used == pytest.approx(
        [t for previous in [SCHEDULE["taid_t_start"], *want[:-1]] for t in (previous, previous)]
    )
    assert all(later >= earlier for earlier, later in zip(want, want[1:], strict=False))  # t never goes back
    linear_after = [SCHEDULE["taid_t_start"] + 0.65 * step / 6 for step in range(6)]
    assert any(t > linear + 1e-3 for t, linear in zip(want[1:], linear_after[1:], strict=True))  # adaptive at work


@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_continues_the_schedule_exactly(tmp_path, tiny_tokenizer, tiny_text_dataset, restore_callbacks):
    def run(name, resume=None):
        args = config(
            tmp_path, output_dir=str(tmp_path / name), save_strategy="steps", save_steps=3,
            restore_callback_states_from_checkpoint=restore_callbacks,
        )  # fmt: skip
        trainer = trainer_for(args, tiny_tokenizer, tiny_text_dataset)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run("whole")
    state = json.loads((tmp_path / "whole" / "checkpoint-3" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["TaidSchedule"]["attributes"]
    step3 = next(e["taid_t"] for e in state["log_history"] if e.get("step") == 3 and "loss" in e)
    assert saved["t"] == pytest.approx(step3, abs=1e-6)
    resumed = run("whole", resume=str(tmp_path / "whole" / "checkpoint-3"))
    for name in ("t", "momentum", "previous_objective"):
        assert getattr(resumed.taid_schedule, name) == pytest.approx(getattr(whole.taid_schedule, name), abs=1e-9)
    logs = [
        [e["taid_t"] for e in trainer.state.log_history if "loss" in e and e["step"] > 3]
        for trainer in (whole, resumed)
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_taid_is_refused_with_a_cache_that_lacks_the_teachers_full_distribution(
    tmp_path, tiny_tokenizer, tiny_text_dataset
):
    check_cache_serves_loss("taid", "dense")
    for mode in ("topk", "sampled"):
        with pytest.raises(ConfigError, match=f"loss='taid'.*cache_mode='{mode}'"):
            check_cache_serves_loss("taid", mode)
    rows = Dataset.from_dict({"input_ids": tiny_text_dataset["input_ids"][:4]})
    teacher = tiny_llama(len(tiny_tokenizer), hidden=24, layers=1)
    plain = config(tmp_path, loss="forward_kl")
    for mode in ("topk", "sampled"):
        path = tmp_path / mode
        TeacherCache.build(
            teacher, rows, path, tokenizer=tiny_tokenizer, args=plain, temperature=1.5, mode=mode, k=4, progress=False
        )
        with pytest.raises(ConfigError, match=f"loss='taid'.*cache_mode='{mode}'"):
            DistillationTrainer(
                model=tiny_llama(len(tiny_tokenizer), hidden=24, layers=1),
                args=config(tmp_path, teacher_cache=str(path)),
                processing_class=tiny_tokenizer,
            )
        with pytest.raises(ConfigError, match=f"loss='taid'.*cache_mode='{mode}'"):  # before the student loads
            DistillationTrainer(
                model=str(tmp_path / "no-student-here"),
                args=config(tmp_path, teacher_cache=str(path)),
                processing_class=tiny_tokenizer,
            )


def test_the_update_survives_an_objective_that_jumps_from_almost_zero():
    from types import SimpleNamespace

    from hf_capgap.trainer.taid import next_t

    settings = SimpleNamespace(taid_t_start=0.0, taid_t_end=1.0, taid_alpha=5e-4, taid_beta=0.99)
    t, momentum = next_t(0.0, 0.0, previous=1e-9, objective=1e-3, progress=0.5, settings=settings)
    assert t == 0.5 and momentum < -709  # the sigmoid of such a momentum is 0: only the linear ramp moves t


def test_a_second_train_starts_the_schedule_afresh_and_evaluation_uses_its_end_target(
    tmp_path, tiny_tokenizer, tiny_text_dataset
):
    trainer = trainer_for(config(tmp_path, max_steps=3), tiny_tokenizer, tiny_text_dataset)
    evaluations = []
    for _ in range(2):
        trainer.train()
        logged = [entry["taid_t"] for entry in trainer.state.log_history if "loss" in entry]
        assert logged[0] == SCHEDULE["taid_t_start"]
        evaluations.append(trainer.evaluate(tiny_text_dataset)["eval_loss"])
        trainer.taid_schedule.t = SCHEDULE["taid_t_start"]  # another t mid-run: evaluation must not change
        assert trainer.evaluate(tiny_text_dataset)["eval_loss"] == pytest.approx(evaluations[-1], abs=1e-7)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"taid_t_start": 1.0}, "taid_t_start=1.0 must be in [0, 1)."),
        ({"taid_t_end": 0.2}, "taid_t_end=0.2 must be in [taid_t_start=0.3, 1]."),
        ({"taid_alpha": -0.1}, "taid_alpha=-0.1 must be in [0, 1]."),
        ({"taid_beta": 1.0}, "taid_beta=1.0 must be in [0, 1)."),
    ],
)
def test_a_bad_schedule_is_refused(tmp_path, values, message):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, **values)
    assert str(info.value) == message
