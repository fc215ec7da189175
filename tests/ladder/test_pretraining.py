"""Teacher pretraining: loss falls, manifest written, finished teachers reused, killed runs resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import DatasetDict
from transformers import LlamaForCausalLM, TrainerCallback

from hf_capgap.data import load_corpus, make_collator, tokenize_and_pack, train_tokenizer
from hf_capgap.ladder import (
    PRETRAIN_PRESETS,
    TEACHER_FORMAT_VERSION,
    TEACHER_KIND,
    WORK_DIR_NAME,
    Checkpoint,
    PretrainSettings,
    build_ladder,
    ensure_ladder,
    last_complete_checkpoint,
    load_teacher,
    pretrain,
)
from hf_capgap.utils.artifacts import ArtifactError, dataset_fingerprint, read_manifest

SEQ_LEN = 32
RUN = dict(
    seq_len=SEQ_LEN, max_tokens=16 * 8 * SEQ_LEN, batch_size=8, learning_rate=1e-2, save_steps=8, logging_steps=8
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Micro models gain nothing from intra-op threads, and on a shared CPU threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    corpus = load_corpus()
    tokenizer = train_tokenizer(corpus["train"].select(range(200))["text"], vocab_size=300)
    train = tokenize_and_pack(corpus["train"].select(range(200)), tokenizer, SEQ_LEN)
    evaluation = tokenize_and_pack(corpus["validation"].select(range(10)), tokenizer, SEQ_LEN).select(range(32))
    (rung,) = build_ladder([30_000], vocab_size=len(tokenizer), max_position_embeddings=SEQ_LEN)
    return rung, tokenizer, train, evaluation


def _loss(model: LlamaForCausalLM, dataset) -> float:
    batch = make_collator(None)(list(dataset))
    with torch.no_grad():
        return model(**batch).loss.item()


class _KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after saving step {state.global_step}")


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    rung, tokenizer, train, evaluation = setup
    output_dir = tmp_path_factory.mktemp("teachers")
    return output_dir, pretrain(rung, train, evaluation, output_dir, tokenizer=tokenizer, **RUN)


def test_pretrain_lowers_loss_and_writes_teacher(setup, trained):
    rung, tokenizer, train, evaluation = setup
    output_dir, path = trained
    torch.manual_seed(0)
    untrained_loss = _loss(LlamaForCausalLM(rung.config), evaluation)
    assert path == output_dir / rung.name
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    assert not list(path.glob("*.bin")) and not list((output_dir / WORK_DIR_NAME).glob("*/checkpoint-*"))
    model, reloaded_tokenizer, manifest = load_teacher(path)
    assert manifest["params"] == rung.params == sum(p.numel() for p in model.parameters())
    assert manifest["tokens_seen"] == RUN["max_tokens"]
    assert manifest["data_fingerprint"] == dataset_fingerprint(train)
    assert manifest["final_validation_loss"] < untrained_loss - 0.3
    assert _loss(model, evaluation) == pytest.approx(manifest["final_validation_loss"], rel=1e-4)
    assert model.generation_config.eos_token_id == reloaded_tokenizer.eos_token_id == tokenizer.eos_token_id


def test_rerun_reuses_finished_teacher_and_refuses_foreign_one(setup, trained):
    rung, tokenizer, train, evaluation = setup
    output_dir, path = trained
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert pretrain(rung, train, evaluation, output_dir, tokenizer=tokenizer, **RUN) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime
    with pytest.raises(ArtifactError, match=r"settings(.|\n)*Delete .* to pretrain it again"):
        pretrain(rung, train, evaluation, output_dir, tokenizer=tokenizer, **{**RUN, "learning_rate": 5e-3})


class _RecordTrainEnd(TrainerCallback):
    ended = False

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = True


@pytest.mark.parametrize("killed_at", [RUN["save_steps"], 2 * RUN["save_steps"]])
def test_killed_run_resumes_from_last_checkpoint(setup, trained, tmp_path, killed_at):
    """Killed after a checkpoint (the last one at max_steps, before the teacher was published): the rerun
    ends as the uninterrupted run, not one step past it, and closes its callbacks either way."""
    from safetensors.torch import load_file
    from transformers.testing_utils import CaptureLogger

    from hf_capgap.ladder import pretraining

    rung, tokenizer, train, evaluation = setup
    with pytest.raises(KeyboardInterrupt):
        pretrain(rung, train, evaluation, tmp_path, tokenizer=tokenizer, callbacks=[_KillAfterSave(killed_at)], **RUN)
    assert not (tmp_path / rung.name).exists()
    checkpoints = list((tmp_path / WORK_DIR_NAME).glob("*/checkpoint-*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-{killed_at}"]
    end = _RecordTrainEnd()
    with CaptureLogger(pretraining.logger) as captured:  # warnings only, the library's default verbosity
        path = pretrain(rung, train, evaluation, tmp_path, tokenizer=tokenizer, callbacks=[end], **RUN)
    assert end.ended
    assert ("finishing from it without training" in captured.out) == (killed_at == 2 * RUN["save_steps"])
    manifest = read_manifest(path, TEACHER_KIND, TEACHER_FORMAT_VERSION)
    assert manifest["resumed_from_step"] == killed_at
    assert manifest["tokens_seen"] == RUN["max_tokens"]
    assert not checkpoints[0].exists()
    uninterrupted = load_file(str(trained[1] / "model.safetensors"))
    for key, tensor in load_file(str(path / "model.safetensors")).items():
        torch.testing.assert_close(tensor, uninterrupted[key])


def test_only_folders_named_exactly_checkpoint_step_are_resumed_from(tmp_path):
    """Copies a user or tool leaves beside the checkpoints are neither resumed from nor outrank them."""
    for name in (
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-3.bak",
        "checkpoint-3-copy",
        "checkpoint-3_old",
        "checkpoint-9-old",
        "old-checkpoint-9",
        "checkpoint-foo",
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == Checkpoint(str(tmp_path / "checkpoint-3"), 3)
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_bad_inputs_fail_before_training(setup, tmp_path):
    rung, tokenizer, train, evaluation = setup
    (small,) = build_ladder([30_000], vocab_size=100, max_position_embeddings=SEQ_LEN)
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain(small, train, evaluation, tmp_path, tokenizer=tokenizer, **RUN)
    with pytest.raises(ValueError, match="seq_len"):
        pretrain(rung, train, evaluation, tmp_path, tokenizer=tokenizer, **{**RUN, "seq_len": 16})
    with pytest.raises(ValueError, match="max_tokens"):
        pretrain(rung, train, evaluation, tmp_path, tokenizer=tokenizer, **{**RUN, "max_tokens": 10})
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="preset"):
        ensure_ladder("huge", tmp_path)
    with pytest.raises(ValueError, match="validation"):
        ensure_ladder("micro", tmp_path, corpus=DatasetDict(train=train), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"300-token vocabulary has no rung \['llama-9M'\]; its rungs are llama-23K"):
        ensure_ladder("micro", tmp_path, tokenizer=tokenizer, only=["llama-9M"])
    assert not any(tmp_path.iterdir())


def test_ensure_ladder_trains_each_missing_rung_once(setup, tmp_path):
    _, tokenizer, _, _ = setup
    full = load_corpus()
    corpus = DatasetDict(train=full["train"].select(range(60)), validation=full["validation"].select(range(5)))
    settings = dataclasses.replace(PRETRAIN_PRESETS["micro"], max_tokens=2 * 16 * 64, save_steps=100)
    ladder = dict(settings=settings, corpus=corpus, tokenizer=tokenizer)
    paths = ensure_ladder("micro", tmp_path / "ladder", **ladder)
    assert len(paths) == len({p.name for p in paths}) >= 2
    manifests = [load_teacher(p)[2] for p in paths]
    assert [m["params"] for m in manifests] == sorted(m["params"] for m in manifests)
    assert len({m["tokenizer_fingerprint"] for m in manifests}) == 1
    mtimes = [(p / "model.safetensors").stat().st_mtime_ns for p in paths]
    assert ensure_ladder("micro", tmp_path / "ladder", **ladder) == paths
    assert [(p / "model.safetensors").stat().st_mtime_ns for p in paths] == mtimes
    assert ensure_ladder("micro", tmp_path / "ladder", **ladder, only=[paths[1].name]) == [paths[1]]


def test_recipe_reads_the_preset_overrides_and_help(capsys):
    import importlib.util
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    spec = importlib.util.spec_from_file_location("pretrain_recipe", recipes / "pretrain.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    run, settings = recipe.parse_config([str(recipes / "configs" / "pretrain_tiny.yaml"), "--max_tokens", "4096"])
    assert (run.preset, run.output_dir, settings.vocab_size, settings.max_tokens) == (
        "tiny",
        "outputs/ladder/tiny",
        2048,
        4096,
    )
    with pytest.raises(ValueError, match="unknown config key"):
        recipe.parse_config([str(recipes / "configs" / "sweep_tiny.yaml")])
    with pytest.raises(SystemExit):
        recipe.parse_config(["--help"])
    text = capsys.readouterr().out
    assert all(f"--{item.name}" in text for item in dataclasses.fields(PretrainSettings))
