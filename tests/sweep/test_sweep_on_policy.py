"""The sweep on-policy (issue 22): lmbda / seq_kd refused with a teacher cache and rows that do not fit, off-policy
settings hashes unchanged, the budget counted in the student's tokens per row, prompts cut from the same training
rows, and a micro on-policy sweep whose students sample their own completions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from datasets import Dataset

import hf_capgap.trainer
from hf_capgap.errors import ConfigError
from hf_capgap.sweep import SweepConfig, run_sweep
from hf_capgap.sweep.cell import on_policy_rows
from hf_capgap.sweep.config import ON_POLICY_FIELDS
from hf_capgap.utils.artifacts import json_sha256
from tests.sweep.test_sweep_remedies import DEFAULT_SETTINGS_SHA256, FAST, REPO, TINY_PRESET_SETTINGS_SHA256

ON_POLICY = {
    "lmbda": 1.0,
    "loss": "reverse_kl",
    "cache_mode": "online",
    "prompt_tokens": 16,
    "max_completion_length": 16,
}


def micro(tmp_path: Path, **overrides) -> SweepConfig:
    values = {"family": "micro", "student_sizes": ["21K", "25K"], "output_dir": str(tmp_path / "sweep")}
    return SweepConfig.from_dict({**values, **overrides})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"lmbda": 1.0}, "lmbda=1.0 generates completions, which cache_mode='topk'"),
        ({"lmbda": 0.5, "cache_mode": "sampled"}, "cache_mode='sampled'"),
        ({"seq_kd": True}, "seq_kd=true .*cache_mode='topk'"),
        ({**ON_POLICY, "seq_len": 64, "max_completion_length": 60}, "prompt_tokens=16 \\+ max_completion_length=60"),
        ({**ON_POLICY, "prompt_tokens": 0}, "prompt_tokens=0"),
        ({**ON_POLICY, "lmbda": 1.5}, "lmbda=1.5"),
        ({**ON_POLICY, "max_completion_length": 0}, "max_completion_length=0"),
        ({**ON_POLICY, "top_p": 0.0}, "top_p"),
    ],
)
def test_bad_on_policy_settings_are_refused_naming_the_field(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        micro(tmp_path, **overrides)
    assert not (tmp_path / "sweep").exists()


def test_off_policy_settings_hashes_are_unchanged_and_on_policy_ones_are_their_own():
    import yaml

    assert json_sha256(SweepConfig().settings()) == DEFAULT_SETTINGS_SHA256
    preset = yaml.safe_load((REPO / "recipes" / "configs" / "sweep_tiny.yaml").read_text())
    assert json_sha256(SweepConfig.from_dict(preset).settings()) == TINY_PRESET_SETTINGS_SHA256
    unused = SweepConfig.from_dict({**preset, "lmbda": 0.0, "max_completion_length": 7, "prompt_tokens": 9})
    assert json_sha256(unused.settings()) == TINY_PRESET_SETTINGS_SHA256, "sampling settings unused off-policy"
    on_policy = SweepConfig.from_dict(
        yaml.safe_load((REPO / "recipes" / "configs" / "sweep_tiny_on_policy.yaml").read_text())
    )
    assert set(ON_POLICY_FIELDS) <= set(on_policy.settings()) and on_policy.settings()["lmbda"] == 1.0
    other = SweepConfig.from_dict({**preset, **ON_POLICY, "lmbda": 0.5})
    assert json_sha256(other.settings()) != json_sha256(SweepConfig.from_dict({**preset, **ON_POLICY}).settings())


def test_the_budget_counts_each_rows_prompt_and_completion(tmp_path):
    off = micro(tmp_path, tokens_per_run=4096, seq_len=64, batch_size=8)
    on = micro(tmp_path, tokens_per_run=4096, seq_len=64, batch_size=8, **ON_POLICY)
    assert (off.row_tokens, off.tokens_per_step, off.steps) == (64, 512, 8)
    assert (on.row_tokens, on.tokens_per_step, on.steps) == (32, 256, 16)


@pytest.mark.parametrize(("lmbda", "completion"), [(1.0, 0), (0.5, 3)])
def test_on_policy_rows_are_the_training_rows_prompts_and_their_continuation(tmp_path, lmbda, completion):
    rows = Dataset.from_list([{"input_ids": list(range(start, start + 10))} for start in (0, 100, 200)])
    config = micro(tmp_path, **{**ON_POLICY, "lmbda": lmbda, "prompt_tokens": 4, "max_completion_length": 3})
    cut = on_policy_rows(rows, config)
    assert cut.column_names == ["input_ids", "completion_mask"]
    assert cut["input_ids"] == [list(range(start, start + 4 + completion)) for start in (0, 100, 200)]
    assert cut["completion_mask"] == [[0] * 4 + [1] * completion] * 3


def test_a_micro_on_policy_sweep_samples_from_the_student_and_records_lmbda(tmp_path, ladder_dir, monkeypatch):
    trainers = []

    class Recording(hf_capgap.trainer.DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(hf_capgap.trainer, "DistillationTrainer", Recording)
    values = {
        **FAST,
        **ON_POLICY,
        "max_completion_length": 16,
        "teachers": ["llama-86K"],
        "ladder_dir": str(ladder_dir),
    }
    config = micro(tmp_path, **values)
    records = run_sweep(config, progress=False)
    assert [record["run_id"] for record in records] == ["21K-from-llama-86K", "25K-from-llama-86K"]
    for record, trainer in zip(records, trainers, strict=True):
        args = trainer.args
        assert (args.lmbda, args.loss, args.max_completion_length, args.teacher_cache) == (1.0, "reverse_kl", 16, None)
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert logged and all(entry["on_policy_share"] == 1.0 for entry in logged)
        assert math.isfinite(record["eval_loss"]) and 0 < record["completion_length"] <= 16
        assert record["settings"]["lmbda"] == 1.0 and record["settings"]["prompt_tokens"] == 16
        assert record["tokens"] == config.steps * 16 * 32, "prompt + completion per row"
        assert trainer.state.global_step == config.steps == 4


def test_mixed_lmbda_cells_train_every_micro_batch_on_completion_tokens_only(tmp_path, ladder_dir, monkeypatch):
    from hf_capgap.data.sft import STUDENT_SAMPLED_KEY

    labelled = []

    class Recording(hf_capgap.trainer.DistillationTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            labelled.append((STUDENT_SAMPLED_KEY in inputs, inputs["labels"].clone()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(hf_capgap.trainer, "DistillationTrainer", Recording)
    values = {**FAST, **ON_POLICY, "lmbda": 0.5, "student_sizes": ["21K"], "teachers": ["llama-86K"]}
    run_sweep(micro(tmp_path, **values, ladder_dir=str(ladder_dir)), progress=False)
    assert {sampled for sampled, _ in labelled} == {True, False}, "both kinds of micro-batch drawn"
    for _, labels in labelled:  # dataset rows too: their prompt (completion_mask 0) is never a label
        assert labels.shape[1] == 32 and (labels[:, :16] == -100).all() and (labels[:, 16:] != -100).any()


def test_an_on_policy_sweep_on_an_off_policy_ledger_is_refused_naming_the_differing_settings(tmp_path, monkeypatch):
    import hf_capgap.sweep.run as run
    from hf_capgap.sweep.config import plan
    from hf_capgap.sweep.ledger import LEDGER_FORMAT_VERSION, write_ledger

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(run, "TeacherSource", no_work)
    off_policy = micro(tmp_path, cache_mode="online")
    spec = plan(off_policy)[0]
    record = {
        "run_id": spec.run_id,
        "format_version": LEDGER_FORMAT_VERSION,
        "student_params": spec.student_params,
        "teacher_params": spec.teacher_params,
        "eval_loss": 5.0,
        "settings_sha256": json_sha256(off_policy.settings()),
        "settings": off_policy.settings(),
    }
    Path(off_policy.output_dir).mkdir(parents=True)
    write_ledger(off_policy.output_dir, [record])
    with pytest.raises(ConfigError, match=r"other settings \(.*lmbda: 'unset' there, 1\.0 here"):
        run_sweep(micro(tmp_path, **ON_POLICY), progress=False)
