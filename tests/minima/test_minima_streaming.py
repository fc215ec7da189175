"""The MiniMA recipe on a stream across processes, on short streams and after torn checkpoints."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_TEXT, tiny_llama
from tests.helpers.launch import two_process_command, two_process_env

REPO = Path(__file__).resolve().parents[2]
WORDS = sorted(set(TINY_TEXT.split()))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """A local teacher folder (with its tokenizer) and a smaller student folder to distil into."""
    root = tmp_path_factory.mktemp("models")
    teacher, student = root / "teacher", root / "student"
    tiny_llama(hidden=32, layers=2).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    tiny_llama(hidden=16, layers=1).save_pretrained(student)
    return teacher, student


def write_documents(folder: Path, documents_per_file: list[int], seed: int = 0) -> str:
    """jsonl files of random sentences over the tiny vocabulary; returns their glob."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for index, count in enumerate(documents_per_file):
        lines = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(4, 14)))}) for _ in range(count)]
        (folder / f"part-{index}.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "*.jsonl")


def recipe_values(root: Path, models, dataset: str, **overrides) -> dict:
    """Streamed, seconds-long settings: rows of 16 tokens, 2 rows per device, 4 steps of 2 processes."""
    teacher, student = models
    values = {
        "run_name": "streamed",
        "output_dir": str(root / "out"),
        "ladder_dir": str(root / "ladder"),
        "teacher": str(teacher),
        "student_init": str(student),
        "student_params": None,
        "dataset": dataset,
        "streaming": True,
        "eval_split": None,
        "baseline": True,
        "seq_len": 16,
        "batch_size": 2,
        "train_tokens": 4 * 2 * 2 * 16,
        "learning_rate": 0.01,
        "eval_rows": 4,
        "eval_batch_size": 4,
        "save_steps": 100,
        "logging_steps": 1,
        "calibration_batches": 1,
    }
    return {**values, **overrides}


def launch_two_processes(out: Path, values: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run tests/helpers/minima_streaming_script.py on 2 gloo processes; kill the whole launch if it hangs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "values.json").write_text(json.dumps(values))
    command = two_process_command(REPO / "tests" / "helpers" / "minima_streaming_script.py", str(out))
    with subprocess.Popen(
        command,
        env=two_process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as launch:
        try:
            stdout, stderr = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGTERM)  # the launcher stops its workers (each in its own session)
            launch.communicate(timeout=60)
            pytest.fail(f"the 2-process launch hung for more than {timeout} s")
    return subprocess.CompletedProcess(command, launch.returncode, stdout, stderr)


def test_two_process_stream_holds_out_its_eval_rows_and_feeds_both_students_the_same_rows(tmp_path, models):
    """Five files (one a single short document): every rank trains on rows of the one stream after the
    held-out rows, and the distilled and from-scratch students get the same rows on each rank."""
    dataset = write_documents(tmp_path / "data", [30, 30, 1, 30, 30])
    result = launch_two_processes(tmp_path / "run", recipe_values(tmp_path, models, dataset))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    held_out = {tuple(row) for row in ranks[0]["eval"]}
    assert len(held_out) == 4 and all({tuple(row) for row in rank["eval"]} == held_out for rank in ranks)
    for rank in ranks:
        assert len(rank["distill"]) == 4 * 2  # 4 steps of 2 rows
        assert rank["distill"] == rank["scratch"]
        assert not held_out & {tuple(row) for row in rank["distill"]}
    assert not {tuple(row) for row in ranks[0]["distill"]} & {tuple(row) for row in ranks[1]["distill"]}


def test_two_process_stream_with_no_training_row_fails_on_every_rank_with_the_cause(tmp_path, models):
    """The held-out rows take the whole stream: both ranks stop with the cause and the fix, none hangs."""
    dataset = write_documents(tmp_path / "data", [4, 1])
    result = launch_two_processes(tmp_path / "run", recipe_values(tmp_path, models, dataset))
    assert result.returncode != 0
    assert "no training row" in result.stderr and "eval_rows" in result.stderr, result.stderr[-4000:]


def stages(values: dict):
    """Config, plan, data, teacher and its identity, as run_minima prepares them (one process)."""
    from hf_capgap.minima import build_config, make_plan
    from hf_capgap.minima import data as minima_data
    from hf_capgap.minima import teacher as minima_teacher

    config = build_config(values)
    plan = make_plan(config)
    location = minima_teacher.teacher_location(config, plan)
    data = minima_data.prepare_data(config, plan, minima_teacher.load_tokenizer(config, location))
    teacher = minima_teacher.load_teacher(config, plan, location)
    return config, plan, data, teacher, minima_teacher.teacher_identity(plan, location, teacher)


def distil_killed_at_step(monkeypatch, step: int, run) -> None:
    """Run ``run`` with a DistillationTrainer that raises KeyboardInterrupt once it saved checkpoint-``step``."""
    from transformers import TrainerCallback

    from hf_capgap.trainer import DistillationTrainer

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    original = DistillationTrainer.__init__
    with monkeypatch.context() as patch:
        patch.setattr(
            DistillationTrainer,
            "__init__",
            lambda self, *a, **kw: original(self, *a, **kw, callbacks=[KillAfterSave()]),
        )
        with pytest.raises(KeyboardInterrupt):
            run()


def test_a_torn_last_checkpoint_is_skipped_on_resume(tmp_path, models, monkeypatch):
    """Killed while checkpoint-2 was written (its weights saved, trainer_state.json not yet): the rerun
    resumes from checkpoint-1, says it skipped checkpoint-2, and finishes."""
    from transformers.testing_utils import CaptureLogger

    from hf_capgap.ladder import pretraining
    from hf_capgap.minima import distill as minima_distill

    dataset = write_documents(tmp_path / "data", [40])
    values = recipe_values(tmp_path, models, dataset, streaming=False, train_tokens=3 * 2 * 16, save_steps=1)
    config, plan, data, teacher, teacher_id = stages(values)
    student = Path(config.student_init)
    distil = lambda: minima_distill.distill_stage(config, plan, teacher, student, data, teacher_id)  # noqa: E731
    distil_killed_at_step(monkeypatch, 1, distil)
    (complete,) = config.work_dir.glob("distill-*/checkpoint-1")
    torn = complete.with_name("checkpoint-2")  # the kill came after its weights, before trainer_state.json
    torn.mkdir()
    shutil.copy(complete / "model.safetensors", torn)

    with CaptureLogger(pretraining.logger) as captured:
        final = distil()
    manifest = json.loads((final / "capgap_manifest.json").read_text())
    assert (manifest["steps"], manifest["resumed_from_step"]) == (3, 1)
    assert f"skipping {torn}" in captured.out


@pytest.mark.parametrize("killed_at", [5, 8])
def test_a_short_stream_is_reported_and_a_resume_in_its_second_pass_is_exact(tmp_path, models, monkeypatch, killed_at):
    """A stream of a few rows under a 16-row budget: a warning names its size, the manifest its distinct
    tokens, and a run killed in the second pass (at step 5, or after its final checkpoint at step 8, before
    the stage published) then rerun ends as the uninterrupted run does, without training a step more."""
    import torch
    from safetensors.torch import load_file
    from transformers.testing_utils import CaptureLogger

    from hf_capgap.minima import data as minima_data
    from hf_capgap.minima import distill as minima_distill

    dataset = write_documents(tmp_path / "data", [12])
    finals = {}
    for name in ("uninterrupted", "killed"):
        values = recipe_values(
            tmp_path,
            models,
            dataset,
            output_dir=str(tmp_path / name),
            eval_rows=2,
            train_tokens=8 * 2 * 16,
            save_steps=1,
        )
        config, plan, data, teacher, teacher_id = stages(values)
        student = Path(config.student_init)
        # data is passed at each call: the rerun after the kill reads a fresh one
        distil = functools.partial(minima_distill.distill_stage, config, plan, teacher, student)
        if name == "killed":
            distil_killed_at_step(monkeypatch, killed_at, functools.partial(distil, data, teacher_id))
            assert data.passes.rows_per_pass < 5 * 2  # steps 5 and on read rows of the second pass
            data = stages(values)[2]  # a fresh process: nothing learnt about the stream yet
        with CaptureLogger(minima_data.logger) as captured:
            finals[name] = distil(data, teacher_id)
        rows_per_pass = data.passes.rows_per_pass
        assert 2 <= rows_per_pass < 8 and f"ran out after {rows_per_pass} rows" in captured.out
        manifest = json.loads((finals[name] / "capgap_manifest.json").read_text())
        assert (manifest["steps"], manifest["train_tokens"], manifest["distinct_train_tokens"]) == (
            8,
            16 * 16,
            rows_per_pass * 16,
        )
        finals[name] = manifest, load_file(str(finals[name] / "model.safetensors"))
    (uninterrupted, weights), (killed, resumed_weights) = finals["uninterrupted"], finals["killed"]
    assert killed["resumed_from_step"] == killed_at and uninterrupted["resumed_from_step"] is None
    assert killed["distinct_train_tokens"] == uninterrupted["distinct_train_tokens"]
    assert killed["train_losses"] == pytest.approx(uninterrupted["train_losses"], rel=1e-5)
    for key, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[key], tensor, rtol=1e-5, atol=1e-6)


def test_a_rerun_from_a_final_checkpoint_saved_before_the_stream_record_reports_distinct_tokens_unknown(
    tmp_path, models, monkeypatch
):
    """A final checkpoint whose trainer_state.json lacks StreamPassesState (saved before it was recorded):
    the rerun reads no row, so it writes distinct_train_tokens None and says why, not train_tokens."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    from hf_capgap.minima import distill as minima_distill

    values = recipe_values(
        tmp_path, models, write_documents(tmp_path / "data", [12]), eval_rows=2, train_tokens=8 * 2 * 16, save_steps=4
    )
    config, plan, data, teacher, teacher_id = stages(values)
    distil = lambda: minima_distill.distill_stage(  # noqa: E731
        config, plan, teacher, Path(config.student_init), stages(values)[2], teacher_id
    )
    distil_killed_at_step(monkeypatch, 8, distil)
    (state_file,) = config.work_dir.glob("distill-*/checkpoint-8/trainer_state.json")
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["StreamPassesState"]
    state_file.write_text(json.dumps(state))
    with CaptureLogger(logging.get_logger(minima_distill.__name__)) as captured:
        manifest = json.loads((distil() / "capgap_manifest.json").read_text())
    assert (manifest["train_tokens"], manifest["distinct_train_tokens"]) == (16 * 16, None)
    assert "distinct_train_tokens is unknown" in captured.out
