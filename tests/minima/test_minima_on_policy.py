"""The MiniMA recipe on-policy (issue 22): lmbda / seq_kd pass through to the DistillationConfig of the distill
stage, need the online teacher and map-style rows (refused before any work, naming the field), leave the identity
of off-policy runs unchanged, and a micro run with lmbda = 1 samples every completion from the student."""

from __future__ import annotations

import json
import math

import pytest

import hf_capgap.trainer
from hf_capgap.minima import MinimaConfig, build_config, run_minima
from hf_capgap.minima.config import ON_POLICY_FIELDS
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
    (stage,) = config.work_dir.glob("distilled-*")
    manifest = json.loads((stage / MANIFEST_NAME).read_text())
    assert manifest["train_tokens"] == manifest["steps"] * config.batch_size * (16 + 16), "prompt + completion"
    assert results is not None and math.isfinite(results["eval"]["distilled"]["loss"])
