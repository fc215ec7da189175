"""The MiniMA recipe end to end at micro scale: export, card, resume/no-op, config errors, law choice."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from hf_capgap import minima
from hf_capgap.law import CapacityGapLaw
from hf_capgap.minima import build_config, load_config, make_plan, run_minima

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "minima.py"


def micro_values(root: Path, **overrides) -> dict:
    """Seconds-long settings: the micro ladder's 86K teacher, two optimizer steps per student."""
    values = {
        "run_name": "micro", "output_dir": str(root / "out"), "ladder": "micro", "ladder_dir": str(root / "ladder"),
        "teacher": "llama-86K", "student_params": None, "seq_len": 64, "batch_size": 8, "train_tokens": 1024, "learning_rate": 0.01,
        "eval_rows": 8, "eval_batch_size": 8, "save_steps": 1, "logging_steps": 1, "calibration_batches": 1,
    }
    return {**values, **overrides}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("minima")
    config = build_config(micro_values(root))
    return config, run_minima(config)


@pytest.fixture()
def no_work(monkeypatch):
    """Fail loudly if a stage that loads or trains a model starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("expensive work started")

    for name in ("load_teacher_model", "prepare_data", "prune_stage", "distill_stage", "scratch_stage"):
        monkeypatch.setattr(minima, name, refuse)


def test_export_is_a_loadable_student_with_card(finished):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, results = finished
    folder = config.run_dir
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "results.json", "capacity_gap_law.png"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) == results["eval"]["distilled"]["params"]
    assert len(AutoTokenizer.from_pretrained(folder)) <= model.config.vocab_size
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "llama-86K"
    assert "distillation" in card.data.tags
    assert card.data.to_dict()["model-index"][0]["results"]
    assert json.loads((folder / "results.json").read_text()) == results


def test_results_follow_the_paper_law_and_compare_all_four_models(finished):
    _, results = finished
    teacher = results["eval"]["teacher"]["params"]
    student = results["eval"]["distilled"]["params"]
    assert abs(student - teacher / 2.5) / (teacher / 2.5) <= 0.02  # pruning hits the law's size within 2%
    assert set(results["eval"]) == {"teacher", "pruned", "distilled", "scratch"}
    assert results["eval"]["scratch"]["params"] == student
    assert results["train_tokens"] == 1024
    table = minima.format_table(results)
    assert "same-size student from scratch" in table and ("beat" in table)


def test_finished_run_rerun_is_a_no_op_that_reprints(finished, no_work, capsys):
    config, results = finished
    assert run_minima(config) == results
    assert "distilled student" in capsys.readouterr().out


def test_lost_export_is_rebuilt_from_finished_stages_without_training(finished, monkeypatch, capsys):
    from transformers import Trainer

    config, results = finished
    shutil.rmtree(config.run_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was retrained")

    monkeypatch.setattr(Trainer, "train", refuse)
    monkeypatch.setattr(minima, "prune_model", refuse, raising=False)
    again = run_minima(config)
    assert again["eval"] == results["eval"]
    assert (config.run_dir / "model.safetensors").is_file()


def test_killed_distillation_resumes_from_its_checkpoint(finished, tmp_path, monkeypatch):
    """A run killed after its first checkpoint continues from it instead of starting over."""
    from transformers import TrainerCallback

    from hf_capgap.artifacts import model_fingerprint
    from hf_capgap.trainer import DistillationTrainer

    config, _ = finished
    config = build_config({**micro_values(Path(config.output_dir).parent), "run_name": "killed",
                           "output_dir": str(tmp_path), "train_tokens": 1536})
    plan = make_plan(config)
    teacher, tokenizer = minima.load_teacher_model(config, plan)
    data = minima.prepare_data(config, tokenizer)
    fingerprint = model_fingerprint(teacher)
    _, pruned_dir, _ = minima.prune_stage(config, plan, teacher, data, fingerprint)

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    original = DistillationTrainer.__init__
    monkeypatch.setattr(DistillationTrainer, "__init__",
                        lambda self, *a, **kw: original(self, *a, **kw, callbacks=[KillAfterFirstCheckpoint()]))
    with pytest.raises(KeyboardInterrupt):
        minima.distill_stage(config, teacher, pruned_dir, data, fingerprint)
    monkeypatch.setattr(DistillationTrainer, "__init__", original)
    assert list(config.work_dir.glob("distill-*/checkpoint-1")) and not list(config.work_dir.glob("distilled-*"))

    final = minima.distill_stage(config, teacher, pruned_dir, data, fingerprint)
    manifest = json.loads((final / "capgap_manifest.json").read_text())
    assert (manifest["steps"], manifest["resumed_from_step"]) == (3, 1)
    assert not (final / "training_args.bin").exists()
    assert not list(config.work_dir.glob("distill-*"))  # checkpoints go once the stage is published


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teachr": "llama-86K"}, "unknown config key(s) ['teachr']"),
        ({"teacher": "llama-9M"}, "teacher='llama-9M' is neither a rung"),
        ({"teacher": "./no/such/folder"}, "teacher='./no/such/folder'"),
        ({"teacher": "meta-llama/Llama-2-7b-hf"}, "HF_HUB_OFFLINE"),
        ({"student_params": 86208}, "must be smaller than its teacher"),
        ({"student_params": 500_000}, "student_params gives 500,000"),
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"alpha": 1.5}, "alpha"),
        ({"train_tokens": "many"}, "train_tokens='many' is not a valid int"),
        ({"seq_len": 128, "train_tokens": 4096}, "seq_len=128 exceeds"),
        ({"student_hidden_size": 32}, "give all of student_hidden_size"),
        ({"teacher": None}, "set teacher"),
        ({"law": "missing/law.json"}, "law=missing/law.json does not exist"),
        ({"push_to_hub": "me/student"}, "push_to_hub='me/student' needs the Hugging Face Hub"),
        ({"push_to_hub": "student"}, "must be 'namespace/name'"),
        ({"ladder": "huge"}, "ladder='huge' is unknown"),
    ],
)
def test_config_errors_stop_before_any_work(tmp_path, no_work, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        run_minima(build_config(micro_values(tmp_path, **overrides)))
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_law_choice_paper_prior_and_fitted_law(tmp_path):
    paper = make_plan(build_config(micro_values(tmp_path)))
    assert paper.student_params == round(86_208 / 2.5)
    law_file = tmp_path / "law.json"
    CapacityGapLaw(ratio=4.0, ratio_ci=(3.5, 4.5), source="fitted").save(law_file)
    fitted = make_plan(build_config(micro_values(tmp_path, law=str(law_file))))
    assert fitted.student_params == round(86_208 / 4.0)
    assert "fitted" in fitted.choice


def test_law_suggests_the_teacher_for_a_requested_student(tmp_path):
    paper = make_plan(build_config(micro_values(tmp_path, teacher=None, student_params=30_000)))
    assert paper.teacher == "llama-86K"  # 2.5 x 30K = 75K: the nearest rung in log size
    law_file = tmp_path / "law.json"
    CapacityGapLaw(ratio=9.0, ratio_ci=None, source="fitted").save(law_file)
    fitted = make_plan(build_config(micro_values(tmp_path, teacher=None, student_params=30_000, law=str(law_file))))
    assert fitted.teacher == "llama-271K"  # 9 x 30K = 270K
    assert fitted.student_params == 30_000


def test_default_config_lets_the_law_pick_the_tiny_teacher():
    """The README's first command: 2.5 x 170K = 425K, so the law picks llama-418K (no weights loaded)."""
    plan = make_plan(load_config([]))
    assert (plan.teacher, plan.teacher_kind, plan.student_params) == ("llama-418K", "ladder", 170_000)
    assert plan.choice == "law (paper) suggests llama-418K for a 170K student"


def test_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: llama-86K\nladder: micro\nseq_len: 64\ntrain_tokens: 1024\n")
    config = load_config([str(path), "--train_tokens", "2048", "--bf16", "false", "--law", "null", "--alpha", "0.25"])
    assert (config.train_tokens, config.bf16, config.law, config.alpha) == (2048, False, None, 0.25)
    assert config.teacher == "llama-86K" and config.seq_len == 64
    with pytest.raises(ValueError, match="--key value pairs"):
        load_config([str(path), "--train_tokens"])
    assert load_config([]).run_name == "minima-tiny"  # the default config file


@pytest.mark.parametrize(("argv", "key"), [(["--no_such_key", "1"], "no_such_key"), (["--teacher", "llama-9M"], "teacher")])
def test_recipe_reports_config_errors_without_a_traceback(no_work, argv, key):
    spec = importlib.util.spec_from_file_location("minima_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(SystemExit) as info:
        recipe.main(argv)
    assert str(info.value.code).startswith("minima: ") and key in str(info.value.code)


@pytest.mark.parametrize("preset", ["minima_tiny", "minima_pythia", "minima_llama2_7b"])
def test_presets_parse(preset):
    config = load_config([str(RECIPE.parent / "configs" / f"{preset}.yaml"), "--bf16", "false"])
    assert (config.loss, config.alpha, config.temperature) == ("forward_kl", 0.5, 1.0)  # MiniMA's loss


def test_llama2_preset_mirrors_the_published_3b_student():
    from transformers import LlamaConfig

    from hf_capgap.pruning import PruneShape, shape_params
    from hf_capgap.pruning_layouts import meta_model

    config = load_config([str(RECIPE.parent / "configs" / "minima_llama2_7b.yaml"), "--bf16", "false"])
    assert config.teacher == "meta-llama/Llama-2-7b-hf"
    assert config.student_shape == {"hidden_size": 3072, "num_hidden_layers": 24, "num_attention_heads": 24,
                                    "intermediate_size": 8192}
    assert (config.adam_beta1, config.adam_beta2, config.weight_decay, config.learning_rate) == (0.9, 0.95, 0.1, 3e-4)
    assert (config.warmup_ratio, config.max_grad_norm, config.seq_len) == (0.01, 1.0, 4096)
    assert config.gradient_checkpointing and config.lr_scheduler_type == "cosine"
    llama2_7b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    teacher = meta_model(llama2_7b)
    assert sum(p.numel() for p in teacher.parameters()) == 6_738_415_616
    student = shape_params(teacher, PruneShape.from_value(config.student_shape))
    assert 2.9e9 < student < 3.1e9  # MiniMA-3B


def test_push_to_hub_uploads_the_finished_export(finished, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    from tests.hub_server import FakeHub

    config, results = finished
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_minima_test_token")
    server = FakeHub(max_requests=100, lifetime_s=60).start()
    try:
        pushed = build_config({**asdict(config), "push_to_hub": "tester/micro", "hub_endpoint": server.url})
        assert run_minima(pushed) == results  # the same run: pushing is not part of its identity
        uploaded = server.files("tester/micro")
    finally:
        server.stop()
    local = {p.name: p.read_bytes() for p in config.run_dir.iterdir() if p.is_file()}
    assert uploaded == local
    assert f"pushed to {server.url}/tester/micro/commit/" in capsys.readouterr().out


def test_teacher_cache_mode_distils_from_the_cache(finished, tmp_path):
    config, _ = finished
    cached = build_config({**micro_values(Path(config.output_dir).parent), "output_dir": str(tmp_path),
                           "teacher_cache": True, "cache_k": 8})
    results = run_minima(cached)
    assert len(list(cached.work_dir.glob("cache-*/capgap_manifest.json"))) == 1
    assert results["eval"]["distilled"]["params"] == results["eval"]["scratch"]["params"]
    assert (cached.run_dir / "model.safetensors").is_file()
