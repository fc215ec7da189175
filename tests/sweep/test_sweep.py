"""Sweep: config validation, plan, ledger atomicity, Hub pre-flight, and a real micro sweep
that is SIGKILLed mid-way, restarted, and fits the law (or says clearly why it cannot)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_capgap.sweep import (
    LAW_FAILURE_FILE,
    LAW_FILE,
    LAW_PLOT_FILE,
    LEDGER_FILE,
    LOCK_FILE,
    SweepConfig,
    append_record,
    family_teachers,
    finished_records,
    plan,
    run_sweep,
    sweep_status,
)
from hf_capgap.utils.artifacts import MANIFEST_NAME, ArtifactError

REPO = Path(__file__).resolve().parents[2]


def _sweep_recipe():
    """recipes/sweep.py as a module, loaded from its file (recipes are scripts, not a package); registered
    in sys.modules, where its dataclasses look their module up."""
    if "sweep_recipe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sweep_recipe", REPO / "recipes" / "sweep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["sweep_recipe"]


MICRO_YAML = REPO / "recipes" / "configs" / "sweep_micro.yaml"
# Two optimiser steps per run and a small held-out set keep the whole micro sweep to seconds.
FAST = {"tokens_per_run": "2048", "eval_rows": "16", "calibration_rows": "16", "student_sizes": "21K"}


def micro(tmp_path: Path, **overrides) -> SweepConfig:
    values = {"family": "micro", "student_sizes": ["21K", "25K"], "output_dir": str(tmp_path / "sweep")}
    return SweepConfig.from_dict({**values, **overrides})


# ---------------------------------------------------------------------- config and plan


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"epochs": 3}, "epochs"),
        ({"student_sizes": []}, "student_sizes"),
        ({"student_sizes": ["271K"]}, "student_sizes"),
        ({"tokens_per_run": 0}, "tokens_per_run"),
        ({"batch_size": -1}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"cache_mode": "dense"}, "cache_mode"),
        ({"cache_mode": "sampled", "loss": "jsd"}, "sampled"),
        ({"cache_sampler": "stratified"}, "cache_sampler"),
        ({"loss": "mse"}, "loss"),
        ({"teachers": ["llama-9M"]}, "teachers"),
        ({"family": "opt"}, "family"),
        ({"student_sizes": ["lots"]}, "lots"),
    ],
)
def test_bad_config_names_the_key(tmp_path, overrides, named):
    with pytest.raises(ValueError, match=named):
        micro(tmp_path, **overrides)
    assert not (tmp_path / "sweep").exists()


def test_plan_pairs_every_student_with_each_larger_teacher(tmp_path):
    teachers = family_teachers("micro")
    config = micro(tmp_path, student_sizes=["21K", "50K", "100K"])
    runs = plan(config)
    expected = {(s, t) for s in (21_000, 50_000, 100_000) for t, size in teachers.items() if size > s}
    assert {(run.student_params, run.teacher) for run in runs} == expected
    assert len({run.run_id for run in runs}) == len(runs)
    assert all(run.teacher_params == teachers[run.teacher] > run.student_params for run in runs)
    teacher_order = [run.teacher_params for run in runs]
    assert teacher_order == sorted(teacher_order), "runs of one teacher share its cache, so they are grouped"
    assert [run.run_id for run in plan(micro(tmp_path, student_sizes=["100K", "50K", "21K"]))] == [
        run.run_id for run in runs
    ]


def test_teacher_subset(tmp_path):
    config = micro(tmp_path, teachers=["llama-86K", "llama-271K"])
    assert {run.teacher for run in plan(config)} == {"llama-86K", "llama-271K"}


# ---------------------------------------------------------------------- ledger


def _record(run_id: str, loss: float) -> dict:
    return {
        "run_id": run_id,
        "format_version": 1,
        "student_params": 21_000,
        "teacher_params": 86_208,
        "eval_loss": loss,
        "settings_sha256": "abc",
    }


def test_torn_last_line_is_dropped_and_the_next_write_repairs_it(tmp_path):
    append_record(tmp_path, _record("a", 5.0))
    append_record(tmp_path, _record("b", 4.0))
    ledger = tmp_path / LEDGER_FILE
    complete = ledger.read_text()
    ledger.write_text(complete + json.dumps(_record("c", 3.0))[:37])
    with pytest.warns(UserWarning, match="torn"):
        assert [record["run_id"] for record in finished_records(tmp_path)] == ["a", "b"]
    with pytest.warns(UserWarning, match="torn"):
        append_record(tmp_path, _record("c", 3.0))
    lines = ledger.read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == ["a", "b", "c"]
    assert ledger.read_text().endswith("\n")


def test_damaged_middle_line_and_duplicates_are_refused(tmp_path):
    ledger = tmp_path / LEDGER_FILE
    good = json.dumps(_record("a", 5.0))
    ledger.write_text(good + "\n{not json\n" + json.dumps(_record("b", 4.0)) + "\n")
    with pytest.raises(ArtifactError, match="line 2"):
        finished_records(tmp_path)
    ledger.write_text(good + "\n" + good + "\n")
    with pytest.raises(ArtifactError, match="more than once"):
        finished_records(tmp_path)


# ---------------------------------------------------------------------- Hub families


def test_hub_family_offline_fails_before_any_work(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = SweepConfig.from_dict({"family": "pythia", "student_sizes": ["70M"], "output_dir": str(tmp_path / "s")})
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        run_sweep(config, progress=False)
    assert not (tmp_path / "s").exists()


def test_hub_family_unreachable_fails_before_any_work(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    config = SweepConfig.from_dict(
        {
            "family": "pythia",
            "student_sizes": ["70M"],
            "teachers": ["EleutherAI/pythia-160m"],
            "output_dir": str(tmp_path / "s"),
        }
    )
    with pytest.raises(ValueError, match="cannot reach the Hugging Face Hub"):
        run_sweep(config, progress=False)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- the micro sweep, for real


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, ladder_dir):
    """A sweep subprocess SIGKILLed right after its first finished run, then run again to the end,
    distilling from sampled caches of independent draws (the default is systematic)."""
    out = tmp_path_factory.mktemp("micro") / "sweep"
    overrides = {
        **FAST,
        "output_dir": str(out),
        "ladder_dir": str(ladder_dir),
        "cache_mode": "sampled",
        "cache_sampler": "multinomial",
    }
    argv = [sys.executable, str(REPO / "recipes" / "sweep.py"), str(MICRO_YAML)]
    argv += [item for key, value in overrides.items() for item in (f"--{key}", value)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (out / LEDGER_FILE).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert (out / LEDGER_FILE).exists(), f"the sweep wrote no record before the kill: {stderr[-2000:]}"
    before = finished_records(out)
    config = SweepConfig.from_dict(_yaml(MICRO_YAML, overrides))
    status_after_kill = sweep_status(config)
    records = run_sweep(config, progress=False)
    return config, before, status_after_kill, records


def _yaml(path: Path, overrides: dict) -> dict:
    import yaml

    return {**yaml.safe_load(path.read_text()), **overrides}


def test_sigkilled_sweep_resumes_without_duplicates(killed_and_resumed):
    config, before, status_after_kill, records = killed_and_resumed
    assert before, "the kill came after at least one finished run"
    assert {row["state"] for row in status_after_kill} <= {"done", "left"}, "a killed run is not 'running'"
    assert sum(row["state"] == "done" for row in status_after_kill) == len(before) < len(plan(config))
    ledger = finished_records(config.output_dir)
    assert sorted(record["run_id"] for record in ledger) == sorted(run.run_id for run in plan(config))
    finished_first = {record["run_id"]: record for record in before}
    for record in ledger:
        if record["run_id"] in finished_first:
            assert record == finished_first[record["run_id"]], "a finished run is never redone"
    assert [record["run_id"] for record in records] == [run.run_id for run in plan(config)]
    assert all(row["state"] == "done" for row in sweep_status(config))
    assert not (Path(config.output_dir) / "running.json").exists()


def test_micro_sweep_records_and_law(killed_and_resumed):
    config, _, _, records = killed_and_resumed
    assert len({record["tokens"] for record in records}) == 1, "every run gets the same token budget"
    for record in records:
        assert record["student_params"] < record["teacher_params"]
        assert abs(record["student_params"] - record["student_target"]) <= 0.02 * record["student_target"]
        assert record["perplexity"] == pytest.approx(2.718281828 ** record["eval_loss"], rel=1e-6)
        assert record["settings"]["tokens_per_run"] == config.tokens_per_run
    out = Path(config.output_dir)
    manifests = [json.loads(path.read_text()) for path in (out / "caches").glob(f"*/{MANIFEST_NAME}")]
    assert len(manifests) == len({record["teacher"] for record in records})
    assert {(m["mode"], m["k"], m["sampler"]) for m in manifests} == {("sampled", config.cache_k, "multinomial")}
    if (out / LAW_FILE).exists():
        assert (out / LAW_PLOT_FILE).stat().st_size > 0
        assert not (out / LAW_FAILURE_FILE).exists()
    else:
        failure = json.loads((out / LAW_FAILURE_FILE).read_text())
        assert "interior optimum" in failure["error"] and failure["runs"] == len(records)
        assert not (out / LAW_PLOT_FILE).exists()


def copy_of_finished_sweep(killed_and_resumed, tmp_path: Path) -> SweepConfig:
    """The finished micro sweep (ledger and caches) in a folder of its own, to damage."""
    config = killed_and_resumed[0]
    shutil.copytree(config.output_dir, tmp_path / "sweep")
    return dataclasses.replace(config, output_dir=str(tmp_path / "sweep"))


def test_scratch_of_a_killed_sweep_is_removed_by_the_next_one(killed_and_resumed, tmp_path):
    config = copy_of_finished_sweep(killed_and_resumed, tmp_path)
    out = Path(config.output_dir)
    stale = out / ".run-k1ll3d"  # what tempfile.mkdtemp(prefix=".run-") left when SIGKILL skipped the cleanup
    (stale / "checkpoint-1").mkdir(parents=True)
    unrelated = out / "run-notes"
    unrelated.mkdir()
    records = run_sweep(config, progress=False)
    assert not stale.exists() and unrelated.is_dir()
    assert records == finished_records(killed_and_resumed[0].output_dir)  # nothing was rerun


def test_a_second_sweep_on_a_busy_folder_is_refused_and_leaves_its_scratch(killed_and_resumed, tmp_path):
    config = copy_of_finished_sweep(killed_and_resumed, tmp_path)
    out = Path(config.output_dir)
    live = out / ".run-live0001"
    live.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242'); f.flush(); print('held', flush=True); "
            "time.sleep(60)",
            str(out / LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=r"another sweep \(process 4242\) is running in output_dir="):
            run_sweep(config, progress=False)
        assert live.is_dir()
    finally:
        holder.kill()
        holder.wait()
    run_sweep(config, progress=False)  # the kernel dropped the dead holder's lock
    assert not live.exists()


def test_diverged_runs_are_kept_unless_redo_failed(killed_and_resumed, tmp_path, capsys):
    config = copy_of_finished_sweep(killed_and_resumed, tmp_path)
    good = finished_records(config.output_dir)
    diverged = good[0]["run_id"]
    lines = [
        json.dumps({**record, "eval_loss": float("nan")} if record["run_id"] == diverged else record, sort_keys=True)
        for record in good
    ]
    (Path(config.output_dir) / LEDGER_FILE).write_text("\n".join(lines) + "\n")

    kept = _sweep_recipe().run_and_report(config)
    assert math.isnan(kept[0]["eval_loss"]) and kept[1:] == good[1:]
    assert f"diverged (eval_loss not finite): {diverged}; run again with --redo_failed true" in capsys.readouterr().out

    redone = run_sweep(dataclasses.replace(config, redo_failed=True), progress=False)
    assert [record["run_id"] for record in redone] == [record["run_id"] for record in good]
    assert redone[1:] == good[1:]  # finished runs are not touched
    assert redone[0]["eval_loss"] == pytest.approx(good[0]["eval_loss"], rel=1e-4)  # the same run, redone on CPU
    assert sorted(r["run_id"] for r in finished_records(config.output_dir)) == sorted(r["run_id"] for r in good)


@pytest.mark.parametrize("preset", ["sweep_pythia", "sweep_gpt2"])
def test_gpu_presets_train_in_bf16_with_accumulation_and_checkpointing(preset):
    parse_config = _sweep_recipe().parse_config

    config, status_only = parse_config([str(REPO / "recipes" / "configs" / f"{preset}.yaml"), "--status"])
    assert status_only and config.bf16 and config.gradient_checkpointing and config.teacher_dtype == "bfloat16"
    assert config.gradient_accumulation_steps > 1 and config.steps * config.tokens_per_step == config.tokens_per_run


def test_recipe_overrides_and_help(capsys):
    parse_config = _sweep_recipe().parse_config

    config, _ = parse_config(
        [str(MICRO_YAML), "--student_sizes", "21K", "50K", "--bf16", "true", "--redo_failed", "true"]
    )
    assert config.student_params == (21_000, 50_000) and config.bf16 and config.redo_failed
    with pytest.raises(ValueError, match="unknown config key"):
        parse_config([str(REPO / "recipes" / "configs" / "minima_tiny.yaml")])
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "--gradient_accumulation_steps" in capsys.readouterr().out
