"""The MiniMA recipe on-policy (issue 22): lmbda / seq_kd pass through to the DistillationConfig of the distill
stage, need the online teacher and map-style rows (refused before any work, naming the field), leave the identity
of off-policy runs unchanged, and a micro run with lmbda = 1 samples every completion from the student."""

from __future__ import annotations

import json
import math

import pytest

import hf_capgap.trainer
from hf_capgap.data.sft import STUDENT_SAMPLED_KEY
from hf_capgap.minima import MinimaConfig, build_config, run_minima
from hf_capgap.minima.config import ON_POLICY_FIELDS
from hf_capgap.minima.dry_run import dry_run
from hf_capgap.minima.export import generation_description, loss_description
from hf_capgap.minima.plan import ladder_rungs
from hf_capgap.utils.artifacts import MANIFEST_NAME, json_sha256
from tests.minima.test_minima import micro_values, no_work  # noqa: F401 - no_work is a fixture

DEFAULT_IDENTITY_SHA256 = "1024a26371d040ff60930d5497a2057e04f9eb447ed4df0afa2966b89226a7eb"
"""json_sha256(MinimaConfig().result_settings()) at commit 546f17b, before MinimaConfig had on-policy settings: the
stage folders and results of a run made then keep their identity."""

ON_POLICY = {"lmbda": 1.0, "loss": "reverse_kl", "prompt_tokens": 16, "max_completion_length": 16, "baseline": False}


def test_off_policy_identity_is_unchanged_and_on_policy_settings_join_it():
    assert json_sha256(MinimaConfig().result_settings()) == DEFAULT_IDENTITY_SHA256
    unused = MinimaConfig(max_completion_length=7, prompt_tokens=9, top_k=3)
    assert json_sha256(unused.result_settings()) == DEFAULT_IDENTITY_SHA256, "sampling settings unused off-policy"
    on_policy = MinimaConfig(lmbda=0.5, max_completion_length=64).result_settings()
    assert set(ON_POLICY_FIELDS) <= set(on_policy) and on_policy["lmbda"] == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_cache": True}, "lmbda=1.0 with teacher_cache=True"),
        ({"lmbda": 0.0, "seq_kd": True, "teacher_cache": True}, "seq_kd=true with teacher_cache=True"),
        ({"streaming": True}, "streaming=True"),
        ({"max_completion_length": 60}, "prompt_tokens=16 + max_completion_length=60 exceeds seq_len=64"),
        ({"lmbda": 2.0}, "lmbda=2.0 must be in [0, 1]"),
        (  # seq_len null: checked against the planned seq_len (the micro ladder's 64)
            {"seq_len": None, "max_completion_length": 60},
            "prompt_tokens=16 + max_completion_length=60 exceeds seq_len=64 (null: the teacher's)",
        ),
        ({"seq_len": None, "max_completion_length": 4096}, "batch_size*gradient_accumulation_steps*(prompt_tokens+"),
    ],
)
def test_on_policy_config_errors_stop_before_any_work(tmp_path, no_work, overrides, message):  # noqa: F811
    with pytest.raises(ValueError) as info:
        run_minima(build_config(micro_values(tmp_path, **{**ON_POLICY, **overrides})))
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_micro_run_with_lmbda_1_samples_from_the_student(tmp_path, monkeypatch):
    trainers = []

    class Recording(hf_capgap.trainer.DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(hf_capgap.trainer, "DistillationTrainer", Recording)
    config = build_config(micro_values(tmp_path, **ON_POLICY))
    results = run_minima(config)
    (trainer,) = trainers
    args = trainer.args
    assert (args.lmbda, args.loss, args.max_completion_length, args.teacher_cache) == (1.0, "reverse_kl", 16, None)
    rows = trainer.train_dataset
    assert {len(row) for row in rows["input_ids"]} == {16} and not any(map(any, rows["completion_mask"])), "prompts"
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["on_policy_share"] == 1.0 and math.isfinite(entry["loss"]) for entry in logged)
    assert args.completion_only_loss is None, "prompt-only rows: the trainer labels each generated completion"
    (stage,) = config.work_dir.glob("distilled-*")
    manifest = json.loads((stage / MANIFEST_NAME).read_text())
    # one count everywhere: rows of prompt + completion (16 + 16), so 1024 tokens are 4 steps of 8 rows
    assert results is not None and math.isfinite(results["eval"]["distilled"]["loss"])
    assert (results["steps"], results["train_tokens"]) == (manifest["steps"], manifest["train_tokens"]) == (4, 1024)
    assert trainer.state.global_step == 4
    card = (config.run_dir / "README.md").read_text()
    assert "| reverse_kl alone (every micro-batch student-sampled) | 0.5 | 1.0 | 0.01 | 4 | 1,024 | 8 | 64 |" in card
    assert "lmbda=1, seq_kd=false" in card and "prompt + completion tokens per row (16 + 16 = 32" in card
    assert "cross-entropy" not in card.split("## Distillation")[1].split("|\n")[2], "no CE on the student's samples"


def test_mixed_lmbda_trains_every_micro_batch_on_completion_tokens_only(tmp_path, monkeypatch):
    labelled = []

    class Recording(hf_capgap.trainer.DistillationTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            labelled.append((STUDENT_SAMPLED_KEY in inputs, inputs["labels"].clone()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(hf_capgap.trainer, "DistillationTrainer", Recording)
    run_minima(build_config(micro_values(tmp_path, **{**ON_POLICY, "lmbda": 0.5, "seed": 1})))
    assert {sampled for sampled, _ in labelled} == {True, False}, "both kinds of micro-batch drawn"
    for _, labels in labelled:
        assert labels.shape[1] == 32 and (labels[:, :16] == -100).all() and (labels[:, 16:] != -100).any()


def test_the_card_states_lmbda_sampling_and_how_each_micro_batch_is_scored():
    config = MinimaConfig(lmbda=0.5, loss="jsd", alpha=0.3, prompt_tokens=8, max_completion_length=24, top_k=5)
    assert loss_description(config) == (
        "jsd alone on student-sampled micro-batches (probability lmbda=0.5); 0.7 x LM cross-entropy + 0.3 x jsd on "
        "dataset micro-batches"
    )
    text = generation_description(config)
    for part in (
        "lmbda=0.5, seq_kd=false",
        "sampling_temperature=1, top_k=5, top_p=1",
        "divergence alone",
        "dataset ones by alpha x divergence + (1 - alpha) x cross-entropy",
        "(8 + 24 = 32",
    ):
        assert part in text
    assert "teacher-sampled ones" in generation_description(MinimaConfig(lmbda=0.5, seq_kd=True))
    assert generation_description(MinimaConfig()) is None
    assert loss_description(MinimaConfig()) == "0.5 x LM cross-entropy + 0.5 x forward_kl"


def test_the_dry_run_adds_generation_and_its_kv_cache_to_the_distill_stage(tmp_path):
    on = dry_run(build_config(micro_values(tmp_path, **{**ON_POLICY, "lmbda": 0.5, "seq_kd": True})))
    off = dry_run(build_config(micro_values(tmp_path, baseline=False)))
    student, teacher = on["student_config"], on["plan"]
    distill = on["memory"]["distill"]

    def kv(model_config, dtype_bytes):  # 2 x layers x kv_heads x head_dim x batch x (prompt + completion) x bytes
        heads = model_config.num_attention_heads
        head_dim = model_config.hidden_size // heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        return 2 * model_config.num_hidden_layers * kv_heads * head_dim * 8 * 32 * dtype_bytes

    assert distill["KV cache, student generation"] == kv(student, 4)
    teacher_config = ladder_rungs(build_config(micro_values(tmp_path)))[teacher.teacher].config
    assert distill["KV cache, teacher generation (seq_kd)"] == kv(teacher_config, 4)
    assert distill["total"] == pytest.approx(sum(value for name, value in distill.items() if name != "total"))
    assert not any(name.startswith("KV") for name in off["memory"]["distill"])
    assert (on["steps"], off["steps"]) == (4, 2), "rows of 16 + 16 tokens, not seq_len 64"
    summary = on["summary"]
    assert "x 32 tokens = 256 tokens per step" in summary and "32 prompt + completion tokens per row" in summary
    assert "lmbda=0.5, seq_kd=true" in summary and "KV cache of generation, estimated (not measured)" in summary
    assert "generate" not in off["summary"]
