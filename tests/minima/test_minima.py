"""The MiniMA recipe end to end at micro scale: export, card, resume/no-op, config errors, law choice,
dry run of the 7B preset, streaming from local files, and the stage boundaries of a 2-process launch."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_capgap.law import CapacityGapLaw, format_params
from hf_capgap.minima import MinimaConfig, build_config, make_plan, parse_minima_args, run_minima
from hf_capgap.minima import data as minima_data
from hf_capgap.minima import distill as minima_distill
from hf_capgap.minima import dry_run as minima_dry_run
from hf_capgap.minima import export as minima_export
from hf_capgap.minima import prune as minima_prune
from hf_capgap.minima import teacher as minima_teacher

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "minima.py"
LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def micro_values(root: Path, **overrides) -> dict:
    """Seconds-long settings: the micro ladder's 86K teacher, two optimizer steps per student."""
    values = {
        "run_name": "micro",
        "output_dir": str(root / "out"),
        "ladder": "micro",
        "ladder_dir": str(root / "ladder"),
        "teacher": "llama-86K",
        "student_params": None,
        "seq_len": 64,
        "batch_size": 8,
        "train_tokens": 1024,
        "learning_rate": 0.01,
        "eval_rows": 8,
        "eval_batch_size": 8,
        "save_steps": 1,
        "logging_steps": 1,
        "calibration_batches": 1,
    }
    return {**values, **overrides}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("minima")
    config = build_config(micro_values(root))
    return config, run_minima(config)


def _refuse(*args, **kwargs):
    raise AssertionError("expensive work started")


@pytest.fixture()
def no_work(monkeypatch):
    """Fail loudly if a stage that loads or trains a model starts."""
    for module, name in (
        (minima_teacher, "teacher_location"),
        (minima_teacher, "load_teacher"),
        (minima_data, "prepare_data"),
        (minima_prune, "prune_stage"),
        (minima_distill, "distill_stage"),
        (minima_distill, "scratch_stage"),
    ):
        monkeypatch.setattr(module, name, _refuse)


def stages(config):
    """Plan, data, teacher and its identity, as run_minima prepares them."""
    plan = make_plan(config)
    location = minima_teacher.teacher_location(config, plan)
    data = minima_data.prepare_data(config, plan, minima_teacher.load_tokenizer(config, location))
    teacher = minima_teacher.load_teacher(config, plan, location)
    return plan, data, teacher, minima_teacher.teacher_identity(plan, location, teacher)


def test_export_is_a_loadable_student_with_card(finished):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, results = finished
    folder = config.run_dir
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "results.json",
        "capacity_gap_law.png",
    ):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) == results["eval"]["distilled"]["params"]
    assert len(AutoTokenizer.from_pretrained(folder)) <= model.config.vocab_size
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None  # a ladder rung has no Hub id: no base_model, no link
    assert card.data.license == "apache-2.0"  # ladder teachers are hf_capgap's own, trained on public-domain text
    assert "huggingface.co/llama-86K" not in card.text and str(config.output_dir) not in card.text
    assert "distillation" in card.data.tags
    assert card.data.to_dict()["model-index"][0]["results"]
    assert json.loads((folder / "results.json").read_text()) == results
    assert not any(str(value).startswith("/") for value in results["settings"].values())  # no machine paths pushed


def test_results_follow_the_paper_law_and_compare_all_four_models(finished):
    _, results = finished
    teacher = results["eval"]["teacher"]["params"]
    student = results["eval"]["distilled"]["params"]
    assert abs(student - teacher / 2.5) / (teacher / 2.5) <= 0.02  # pruning hits the law's size within 2%
    assert set(results["eval"]) == {"teacher", "pruned", "distilled", "scratch"}
    assert all(score is not None for score in results["eval"].values())
    assert results["eval"]["scratch"]["params"] == student
    assert results["train_tokens"] == 1024
    table = minima_export.format_table(results)
    assert "same-size student from scratch" in table and ("beat" in table)


def test_finished_run_rerun_is_a_no_op_that_reprints(finished, no_work, capsys):
    config, results = finished
    assert run_minima(config, show=print) == results
    assert "distilled student" in capsys.readouterr().out


def test_lost_export_is_rebuilt_from_finished_stages_without_training(finished, monkeypatch, capsys):
    from transformers import Trainer

    config, results = finished
    shutil.rmtree(config.run_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was retrained")

    monkeypatch.setattr(Trainer, "train", refuse)
    monkeypatch.setattr("hf_capgap.pruning.prune_model", refuse)
    again = run_minima(config)
    assert again["eval"] == results["eval"]
    assert (config.run_dir / "model.safetensors").is_file()


def test_killed_distillation_resumes_from_its_checkpoint(finished, tmp_path, monkeypatch):
    """A run killed after its first checkpoint continues from it instead of starting over."""
    config, _ = finished
    config = build_config(
        {
            **micro_values(Path(config.output_dir).parent),
            "run_name": "killed",
            "output_dir": str(tmp_path),
            "train_tokens": 1536,
        }
    )
    plan, data, teacher, teacher_id = stages(config)
    pruned_dir, _ = minima_prune.prune_stage(config, plan, teacher, data, teacher_id)
    kill_after_first_checkpoint(
        monkeypatch, lambda: minima_distill.distill_stage(config, plan, teacher, pruned_dir, data, teacher_id)
    )
    assert list(config.work_dir.glob("distill-*/checkpoint-1")) and not list(config.work_dir.glob("distilled-*"))

    final = minima_distill.distill_stage(config, plan, teacher, pruned_dir, data, teacher_id)
    manifest = json.loads((final / "capgap_manifest.json").read_text())
    assert (manifest["steps"], manifest["resumed_from_step"]) == (3, 1)
    assert not (final / "training_args.bin").exists()
    assert not list(config.work_dir.glob("distill-*"))  # checkpoints go once the stage is published


def kill_after_first_checkpoint(monkeypatch, work):
    """Run ``work`` with a DistillationTrainer that raises KeyboardInterrupt once it saved a checkpoint."""
    from transformers import TrainerCallback

    from hf_capgap.trainer import DistillationTrainer

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    original = DistillationTrainer.__init__
    monkeypatch.setattr(
        DistillationTrainer,
        "__init__",
        lambda self, *a, **kw: original(self, *a, **kw, callbacks=[KillAfterFirstCheckpoint()]),
    )
    with pytest.raises(KeyboardInterrupt):
        work()
    monkeypatch.setattr(DistillationTrainer, "__init__", original)


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
        ({"train_tokens": "many"}, "train_tokens='many' is not a count"),
        ({"batch_size": 1.5}, "batch_size=1.5 is not an integer"),
        ({"student_init": "no/such/student"}, "student_init=no/such/student holds no config.json"),
        ({"dataset": "no-such-*.jsonl"}, "matches no"),
        ({"teacher_hub_id": "~/models/teacher"}, "must be a Hub id"),
        ({"streaming": True, "teacher_cache": True}, "teacher_cache needs a fixed set"),
        ({"seq_len": 128, "train_tokens": 4096}, "seq_len=128 exceeds"),
        ({"student_hidden_size": 32}, "give all of student_hidden_size"),
        ({"teacher": None}, "set teacher"),
        ({"law": "missing/law.json"}, "law=missing/law.json does not exist"),
        ({"push_to_hub": "me/student"}, "push_to_hub='me/student' needs the Hugging Face Hub"),
        ({"push_to_hub": "student"}, "must be 'namespace/name'"),
        ({"ladder": "huge"}, "ladder='huge' is unknown"),
        ({"cache_sampler": "stratified"}, "cache_sampler='stratified' must be one of"),
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
    plan = make_plan(parse_minima_args([]))
    assert (plan.teacher, plan.teacher_kind, plan.student_params) == ("llama-418K", "ladder", 170_000)
    assert plan.choice == "law (paper) suggests llama-418K for a 170K student"


def test_tiny_preset_file_repeats_the_dataclass_defaults():
    """The default run needs no file; the shipped YAML spells out the same settings."""
    assert parse_minima_args([str(REPO / "recipes" / "configs" / "minima_tiny.yaml")]) == MinimaConfig()


def test_yaml_typed_overrides_and_sizes_with_suffixes(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: llama-86K\nladder: micro\nseq_len: 64\ntrain_tokens: 1024\nstudent_params: null\n")
    config = parse_minima_args(
        [str(path), "--train_tokens", "2K", "--bf16", "false", "--law", "null", "--alpha", "0.25"]
    )
    assert (config.train_token_count, config.bf16, config.law, config.alpha) == (2000, False, None, 0.25)
    assert config.teacher == "llama-86K" and config.seq_len == 64
    assert build_config({"student_params": "1.5B"}).student_param_count == 1_500_000_000
    assert build_config({"train_tokens": "2e9"}).result_settings()["train_tokens"] == 2_000_000_000
    with pytest.raises(ValueError, match="unknown config key"):
        (tmp_path / "bad.yaml").write_text("teachr: x\n")
        parse_minima_args([str(tmp_path / "bad.yaml")])
    assert parse_minima_args([]).run_name == "minima-tiny"  # no file: the tiny preset


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        parse_minima_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{item.name}" in text for item in dataclasses.fields(MinimaConfig))


@pytest.mark.parametrize(
    ("argv", "key"), [(["--no_such_key", "1"], "no_such_key"), (["--teacher", "llama-9M"], "teacher")]
)
def test_recipe_reports_config_errors_without_a_traceback(no_work, argv, key, capsys):
    spec = importlib.util.spec_from_file_location("minima_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(SystemExit) as info:
        recipe.main(argv)
    assert str(info.value.code).startswith("minima: ")
    assert key in str(info.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("preset", ["minima_tiny", "minima_pythia", "minima_llama2_7b", "minima_own_model"])
def test_presets_parse(preset):
    config = parse_minima_args([str(RECIPE.parent / "configs" / f"{preset}.yaml")])
    assert (config.loss, config.alpha, config.temperature) == ("forward_kl", 0.5, 1.0)  # MiniMA's loss


@pytest.mark.parametrize("preset", ["minima_pythia", "minima_llama2_7b"])
def test_gpu_presets_are_runnable_by_construction(preset):
    config = parse_minima_args([str(RECIPE.parent / "configs" / f"{preset}.yaml")])
    assert config.bf16 and config.gradient_checkpointing and config.streaming and not config.baseline
    assert config.teacher_dtype == "bfloat16" and config.seq_len is not None


def test_llama2_preset_mirrors_the_published_3b_student():
    config = parse_minima_args([str(RECIPE.parent / "configs" / "minima_llama2_7b.yaml")])
    assert config.teacher == "meta-llama/Llama-2-7b-hf"
    assert config.student_shape == {
        "hidden_size": 3072,
        "num_hidden_layers": 24,
        "num_attention_heads": 24,
        "intermediate_size": 8192,
    }
    assert (config.adam_beta1, config.adam_beta2, config.weight_decay, config.learning_rate) == (0.9, 0.95, 0.1, 3e-4)
    assert (config.warmup_ratio, config.max_grad_norm, config.seq_len) == (0.01, 1.0, 4096)
    assert config.lr_scheduler_type == "cosine" and config.layer_selection == "middle"


def llama2_7b_folder(root: Path) -> Path:
    """A folder holding only LLaMA-2-7B's config.json (no weights, no tokenizer)."""
    folder = root / "llama-2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG))
    return folder


@pytest.mark.parametrize(
    ("launch", "strategy"), [("fsdp.yaml", "fsdp"), ("deepspeed_zero3.yaml", "zero3"), ("ddp.yaml", "ddp")]
)
def test_dry_run_of_the_7b_preset_from_a_config_only_folder(tmp_path, monkeypatch, launch, strategy):
    from hf_capgap.minima.dry_run import GIB
    from hf_capgap.models import teacher_loading

    monkeypatch.setattr(teacher_loading, "load_frozen_teacher", _refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _refuse)
    teacher = llama2_7b_folder(tmp_path)
    config = parse_minima_args(
        [
            str(RECIPE.parent / "configs" / "minima_llama2_7b.yaml"),
            "--teacher",
            str(teacher),
            "--output_dir",
            str(tmp_path / "out"),
            "--dry_run",
            "--accelerate_config",
            str(REPO / "recipes" / "accelerate" / launch),
        ]
    )
    from hf_capgap.minima.dry_run import dry_run

    report = dry_run(config)
    out = report["summary"]
    assert report["teacher_params"] == 6_738_415_616
    assert 2.9e9 < report["student_params"] < 3.1e9
    student = report["student_config"]
    assert (
        student.hidden_size,
        student.num_hidden_layers,
        student.num_attention_heads,
        student.intermediate_size,
    ) == (3072, 24, 24, 8192)
    assert "hidden 3072, 24 layers, 24 heads (24 KV), MLP 8192" in out and "6,738,415,616 params" in out
    assert (
        "memory per GPU by stage, estimated from the shapes (not measured" in out and f"{strategy}, 8 process" in out
    )
    memory = report["memory"]
    assert report["precision"] == minima_dry_run.Precision("bfloat16", "bfloat16")
    assert list(memory) == ["teacher load", "prune (Taylor scores, one process)", "distill", "evaluation"]
    assert memory["teacher load"]["total"] == 2 * 6_738_415_616  # whole, on every GPU, whatever the launch
    assert report["peak"] == max(((name, parts["total"]) for name, parts in memory.items()), key=lambda x: x[1])
    assert f"peak: {report['peak'][0]}" in out
    distill = memory["distill"]
    if strategy == "ddp":  # every rank holds the whole student state and the whole bf16 teacher
        assert distill["student weights (fp32)"] == 4 * report["student_params"]
        assert distill["teacher weights"] == 2 * 6_738_415_616
    else:
        assert distill["student weights (fp32)"] == 4 * report["student_params"] / 8
        assert distill["teacher weights"] == 2 * 6_738_415_616 / 8
        assert "the teacher is loaded whole onto every GPU" in out  # before sharding: the FSDP / ZeRO-3 load peak
        assert report["peak"][1] < 80 * GIB
    steps = report["steps"]
    assert steps == 126_000_000_000 // (4 * 8 * 4096 * 8)
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_the_cache_size(tmp_path, capsys):
    teacher = llama2_7b_folder(tmp_path)
    config = parse_minima_args(
        [
            str(RECIPE.parent / "configs" / "minima_llama2_7b.yaml"),
            "--teacher",
            str(teacher),
            "--dry_run",
            "--teacher_cache",
            "true",
            "--streaming",
            "false",
            "--train_tokens",
            "1B",
        ]
    )
    report = run_minima(config, show=print)
    assert report is None and "teacher cache (topk, k=64) on disk, estimated" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("launch", "bf16", "teacher_dtype", "expected"),
    [
        ("cpu.yaml", False, "auto", ("float32", "float32")),  # auto is fp32 on a CPU; no mixed precision
        ("ddp.yaml", False, "auto", ("bfloat16", "bfloat16")),  # a GPU launch with mixed_precision: bf16
        ("cpu.yaml", True, "float16", ("float16", "bfloat16")),
    ],
)
def test_dry_run_uses_the_precision_that_runs(tmp_path, launch, bf16, teacher_dtype, expected):
    config = build_config(
        micro_values(
            tmp_path,
            dry_run=True,
            bf16=bf16,
            teacher_dtype=teacher_dtype,
            train_tokens=8192,
            accelerate_config=str(REPO / "recipes" / "accelerate" / launch),
        )
    )
    report = minima_dry_run.dry_run(config)
    assert report["precision"] == minima_dry_run.Precision(*expected)
    cpu_launch = str(REPO / "recipes" / "accelerate" / "cpu.yaml")
    fp32 = minima_dry_run.dry_run(
        dataclasses.replace(config, bf16=False, teacher_dtype="float32", accelerate_config=cpu_launch)
    )
    scale = {"float32": 1, "bfloat16": 2, "float16": 2}
    assert fp32["memory"]["distill"]["student activations"] == (
        scale[expected[1]] * report["memory"]["distill"]["student activations"]
    )
    assert fp32["memory"]["teacher load"]["total"] == scale[expected[0]] * report["memory"]["teacher load"]["total"]


def test_dry_run_places_the_teacher_with_the_affine_line_it_prints(tmp_path):
    law_file = tmp_path / "law.json"
    CapacityGapLaw(
        ratio=3.0, ratio_ci=None, source="fitted", through_origin=False, slope_affine=4.5, intercept=-60_000.0
    ).save(law_file)
    report = minima_dry_run.dry_run(build_config(micro_values(tmp_path, dry_run=True, law=str(law_file))))
    expected = 4.5 * report["student_params"] - 60_000
    assert f"teacher for this student has {format_params(expected)} parameters" in report["summary"]
    assert report["law_teacher_params"] == pytest.approx(expected)

    CapacityGapLaw(
        ratio=3.0, ratio_ci=None, source="fitted", through_origin=False, slope_affine=1.5, intercept=-20_000.0
    ).save(law_file)
    report = minima_dry_run.dry_run(
        build_config(micro_values(tmp_path, dry_run=True, law=str(law_file), student_params=30_000))
    )
    assert 1.5 * report["student_params"] - 20_000 <= report["student_params"]
    assert report["law_teacher_params"] is None
    assert "predicts no teacher larger than this" in report["summary"]


def test_dry_run_counts_the_teacher_where_it_is_loaded(tmp_path):
    """With teacher_cache the teacher is freed once the cache is built: counted there, not in distillation."""
    online = minima_dry_run.dry_run(build_config(micro_values(tmp_path, dry_run=True)))["memory"]
    cached = minima_dry_run.dry_run(build_config(micro_values(tmp_path, dry_run=True, teacher_cache=True)))["memory"]
    teacher = online["teacher load"]["total"]
    assert online["distill"]["teacher weights"] == teacher and "teacher cache build" not in online
    assert cached["distill"]["teacher weights"] == 0
    assert cached["teacher cache build"]["teacher weights (unsharded)"] == teacher


MEASURE_STAGE = """
import json, sys
from pathlib import Path

from hf_capgap.minima import data as minima_data
from hf_capgap.minima import distill as minima_distill
from hf_capgap.minima import prune as minima_prune
from hf_capgap.minima import teacher as minima_teacher
from hf_capgap.minima import build_config, make_plan

config, stage = build_config(json.loads(sys.argv[1])), sys.argv[2]
plan = make_plan(config)
location = minima_teacher.teacher_location(config, plan)
data = minima_data.prepare_data(config, plan, minima_teacher.load_tokenizer(config, location))

def kib(key):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1])

resident = kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is this stage's
if stage == "baseline (from scratch)":
    minima_distill.scratch_stage(config, plan, Path(config.student_init), data)
else:
    teacher = minima_teacher.load_teacher(config, plan, location)
    teacher_id = minima_teacher.teacher_identity(plan, location, teacher)
    if stage == "distill":
        minima_distill.distill_stage(config, plan, teacher, Path(config.student_init), data, teacher_id)
    else:
        minima_prune.prune_stage(config, plan, teacher, data, teacher_id)
print(json.dumps(1024 * (kib("VmHWM") - resident)))
"""


def measured_stage_peak(values: dict, stage: str) -> int:
    """Bytes a stage adds to its process's peak resident memory (a fresh process, data already loaded)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_CAPGAP_CACHE": str(Path(values["output_dir"]).parent / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_STAGE, json.dumps(values), stage],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak")
def test_dry_run_estimate_is_within_2x_of_each_measured_stage_peak(tmp_path):
    """Each stage's estimate is within a factor of 2 either way of the peak it measures on CPU (fp32:
    activations dominate at this size, so the precision is what is checked; the runtime is not counted)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_capgap.data import default_tokenizer

    tokenizer = default_tokenizer(2048, cache_dir=tmp_path / "cache")
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    values = {
        "run_name": "memory",
        "output_dir": str(tmp_path / "out"),
        "teacher": str(teacher),
        "student_params": str(sum(p.numel() for p in model.parameters()) // 2),
        "seq_len": 256,
        "batch_size": 16,
        "eval_batch_size": 16,
        "train_tokens": 4096,
        "eval_rows": 8,
        "calibration_batches": 1,
        "save_steps": 100,
        "logging_steps": 1,
    }
    stages = {"prune (Taylor scores, one process)": values}
    measured = {
        "prune (Taylor scores, one process)": measured_stage_peak(values, "prune (Taylor scores, one process)")
    }
    (pruned,) = (tmp_path / "out" / ".work" / "memory").glob("pruned-*")
    from_pruned = {**values, "student_params": None, "student_init": str(pruned)}
    for stage in ("distill", "baseline (from scratch)"):
        stages[stage] = from_pruned
        measured[stage] = measured_stage_peak(from_pruned, stage)
    for stage, stage_values in stages.items():
        report = minima_dry_run.dry_run(build_config({**stage_values, "dry_run": True}))
        assert report["precision"] == minima_dry_run.Precision("float32", "float32")  # auto on a CPU, bf16: false
        estimate = report["memory"][stage]["total"]
        assert measured[stage] / 2 <= estimate <= 2 * measured[stage], (stage, estimate, measured)


def local_text_files(root: Path, files: int = 4) -> Path:
    """Plain-text files cut from the embedded corpus (the micro ladder's tokenizer knows its words)."""
    from hf_capgap.data import load_corpus

    texts = load_corpus()["train"].select(range(120))["text"]
    folder = root / "texts"
    folder.mkdir()
    for index in range(files):
        (folder / f"part-{index}.txt").write_text("\n".join(texts[index::files]))
    return folder


def test_streaming_from_local_text_files_resumes_and_never_holds_the_data(finished, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import ModelCard

    config, _ = finished
    texts = local_text_files(tmp_path)
    values = {
        **micro_values(Path(config.output_dir).parent),
        "output_dir": str(tmp_path / "out"),
        "run_name": "streamed",
        "dataset": str(texts / "*.txt"),
        "streaming": True,
        "baseline": False,
        "train_tokens": 1536,
    }
    streamed = build_config(values)
    plan, data, _, _ = stages(streamed)
    assert isinstance(data.train, datasets.IterableDataset)  # packed on the fly, never a table of all rows
    assert len(data.eval) == streamed.eval_rows and "rows_sha" not in data.identity
    assert data.identity["data_files"] == [
        (f"part-{i}.txt", (texts / f"part-{i}.txt").stat().st_size) for i in range(4)
    ]

    kill_after_first_checkpoint(monkeypatch, lambda: run_minima(streamed))
    assert list(streamed.work_dir.glob("distill-*/checkpoint-1"))
    results = run_minima(streamed)
    (distilled,) = streamed.work_dir.glob("distilled-*")
    manifest = json.loads((distilled / "capgap_manifest.json").read_text())
    assert (manifest["steps"], manifest["resumed_from_step"]) == (3, 1)
    assert not list(streamed.work_dir.glob("scratch*"))  # baseline: false trains one student
    assert results["eval"]["scratch"] is None
    assert "same-size student from scratch, same tokens" in minima_export.format_table(results)
    assert "not run" in minima_export.format_table(results)
    card = ModelCard.load(streamed.run_dir / "README.md")
    assert "| Same-size student trained from scratch | not run | not run |" in card.text
    assert str(tmp_path) not in card.text and "local files (*.txt)" in card.text
    assert str(tmp_path) not in (streamed.run_dir / "results.json").read_text()


def launch_recipe(tmp_path: Path, overrides: dict, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_CAPGAP_CACHE": str(tmp_path / "cache")}
    launcher = ["--config_file", str(REPO / "recipes" / "accelerate" / "cpu.yaml")] if processes > 1 else ["--cpu"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--main_process_port",
        "0",
        str(RECIPE),
        *(item for key, value in overrides.items() for item in (f"--{key}", str(value))),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_launch_refuses_to_prune_before_any_work(tmp_path):
    result = launch_recipe(tmp_path, {**micro_values(tmp_path), "student_params": "null"})
    assert result.returncode != 0
    assert "pruning is a one-process stage" in result.stderr and "--student_init" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ladder").exists()


def test_two_process_distillation_from_a_pruned_folder_matches_one_process(finished, tmp_path):
    """Same global batch (2 x 4 rows vs 1 x 8), same steps: the loss curves agree within tolerance."""
    config, _ = finished
    (pruned,) = config.work_dir.glob("pruned-*")
    common = {
        **micro_values(Path(config.output_dir).parent),
        "student_init": str(pruned),
        "baseline": "false",
        "train_tokens": 2048,
        "save_steps": 100,
        "logging_steps": 1,
    }
    curves = {}
    for processes, batch_size in ((1, 8), (2, 4)):
        out = tmp_path / f"out{processes}"
        result = launch_recipe(tmp_path, {**common, "output_dir": out, "batch_size": batch_size}, processes)
        assert result.returncode == 0, result.stderr[-3000:]
        (distilled,) = (out / ".work" / "micro").glob("distilled-*")
        curves[processes] = json.loads((distilled / "capgap_manifest.json").read_text())["train_losses"]
        assert json.loads((out / "micro" / "results.json").read_text())["train_tokens"] == 2048
    assert len(curves[1]) == len(curves[2]) == 2048 // (8 * 64)
    assert curves[2] == pytest.approx(curves[1], rel=0.05)


def test_push_to_hub_uploads_the_finished_export(finished, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    from tests.helpers.hub_server import FakeHub

    config, results = finished
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_minima_test_token")
    server = FakeHub(max_requests=100, lifetime_s=60).start()
    try:
        pushed = build_config(
            {**dataclasses.asdict(config), "push_to_hub": "tester/micro", "hub_endpoint": server.url}
        )
        assert run_minima(pushed, show=print) == results  # the same run: pushing is not part of its identity
        uploaded = server.files("tester/micro")
    finally:
        server.stop()
    local = {p.name: p.read_bytes() for p in config.run_dir.iterdir() if p.is_file()}
    assert uploaded == local
    assert 'from_pretrained("tester/micro")' in local["README.md"].decode()  # the card names the pushed repo
    assert f"pushed to {server.url}/tester/micro/commit/" in capsys.readouterr().out


def watch_teacher_during_training(monkeypatch) -> list[tuple[str, bool]]:
    """(trainer class, whether the loaded teacher is still alive) at the start of every Trainer.train."""
    import weakref

    from transformers import Trainer

    teachers, seen = [], []
    load, train = minima_teacher.load_teacher, Trainer.train

    def load_and_watch(*args, **kwargs):
        teacher = load(*args, **kwargs)
        teachers.append(weakref.ref(teacher))
        return teacher

    def train_and_report(self, *args, **kwargs):
        seen.append((type(self).__name__, teachers[-1]() is not None))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(minima_teacher, "load_teacher", load_and_watch)
    monkeypatch.setattr(Trainer, "train", train_and_report)
    return seen


def test_teacher_cache_mode_distils_from_the_cache(finished, tmp_path, monkeypatch):
    """The teacher is scored and freed once its cache is built: no student trains with it in memory."""
    config, online = finished
    cached = build_config(
        {
            **micro_values(Path(config.output_dir).parent),
            "output_dir": str(tmp_path),
            "teacher_cache": True,
            "cache_k": 8,
        }
    )
    seen = watch_teacher_during_training(monkeypatch)
    results = run_minima(cached)
    assert seen == [("DistillationTrainer", False), ("Trainer", False)]
    assert results["eval"]["teacher"] == online["eval"]["teacher"]  # scored before it was freed, same numbers
    (manifest,) = cached.work_dir.glob("cache-*/capgap_manifest.json")
    assert results["eval"]["distilled"]["params"] == results["eval"]["scratch"]["params"]
    assert (cached.run_dir / "model.safetensors").is_file()
    # The dry run's size estimate is what the cache takes on disk (Arrow framing aside).
    on_disk = sum(shard["bytes"] for shard in json.loads(manifest.read_text())["shards"])
    plan = make_plan(cached)
    estimate = minima_dry_run.cache_bytes(cached, plan, json.loads(manifest.read_text())["real_vocab_size"])
    assert estimate <= on_disk <= 1.2 * estimate


def test_online_teacher_is_freed_before_the_baseline_trains(finished, tmp_path, monkeypatch):
    seen = watch_teacher_during_training(monkeypatch)
    ladder = micro_values(Path(finished[0].output_dir).parent)  # the pretrained micro ladder: no teacher training
    results = run_minima(build_config({**ladder, "output_dir": str(tmp_path), "train_tokens": 512}))
    assert seen == [("DistillationTrainer", True), ("Trainer", False)]
    assert all(score is not None for score in results["eval"].values())


def test_local_jsonl_text_field_and_chat_messages(finished, tmp_path):
    """A jsonl file with a custom text column packs; `messages` rows go through the chat template,
    and without a template the refusal names the fix before any model runs."""
    import datasets

    from hf_capgap.data import load_corpus, tokenize_and_pack

    config, _ = finished
    texts = load_corpus()["train"].select(range(60))["text"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": text}) + "\n" for text in texts))
    chats = [
        [{"role": "user", "content": a[:400]}, {"role": "assistant", "content": b[:400]}]
        for a, b in zip(texts[::2], texts[1::2], strict=False)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    base = {**micro_values(Path(config.output_dir).parent), "output_dir": str(tmp_path / "out"), "train_tokens": 512}

    with_body = build_config({**base, "dataset": str(tmp_path / "docs.jsonl"), "dataset_text_field": "body"})
    plan = make_plan(with_body)
    tokenizer = minima_teacher.load_tokenizer(with_body, minima_teacher.teacher_location(with_body, plan))
    data = minima_data.prepare_data(with_body, plan, tokenizer)
    assert len(data.train) == 512 // plan.seq_len and {len(row) for row in data.train["input_ids"]} == {plan.seq_len}
    assert len(data.eval) == with_body.eval_rows  # held out of the file (no validation split)

    chat = build_config({**base, "dataset": str(tmp_path / "chat.jsonl")})
    with pytest.raises(ValueError, match="no chat template"):
        minima_data.prepare_data(chat, plan, tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert len(minima_data.prepare_data(chat, plan, tokenizer).train) == 512 // plan.seq_len
    packed = tokenize_and_pack(datasets.Dataset.from_dict({"messages": chats[:2]}), tokenizer, 16)["input_ids"]
    rendered = tokenizer.apply_chat_template(chats[0], tokenize=False)
    assert packed[0] == tokenizer(rendered, add_special_tokens=False)["input_ids"][:16]
    with pytest.raises(ValueError, match="neither the text column 'text' nor chat 'messages'"):
        minima_data.prepare_data(build_config({**base, "dataset": str(tmp_path / "docs.jsonl")}), plan, tokenizer)


def test_reading_and_planning_build_no_training_arguments(tmp_path, monkeypatch):
    """Under an accelerate ZeRO-3 launch, building TrainingArguments registers zero.Init for every model
    loaded afterwards (the teacher included): settings are checked and planned without one."""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "__post_init__", _refuse)
    config = build_config(micro_values(tmp_path, bf16=True, gradient_checkpointing=True))
    assert make_plan(config).teacher == "llama-86K"


def test_one_training_arguments_builder_sets_length_precision_and_checkpointing(tmp_path):
    from hf_capgap.trainer import DistillationConfig
    from hf_capgap.utils.training_arguments import StudentTraining, student_training_arguments

    training = StudentTraining(
        steps=10,
        batch_size=2,
        seq_len=4096,
        learning_rate=3e-4,
        gradient_accumulation_steps=8,
        gradient_checkpointing=True,
    )
    args = student_training_arguments(DistillationConfig, tmp_path, training, save_steps=None, logging_steps=1)
    assert args.max_length == 4096  # TRL would truncate packed rows to its 1024 default otherwise
    assert args.activation_checkpointing and args.gradient_accumulation_steps == 8
    assert args.save_strategy == "no"


def test_card_names_a_local_teachers_hub_origin_and_license_never_its_path(tmp_path):
    from hf_capgap.minima.plan import Plan, teacher_hub_id

    folder = llama2_7b_folder(tmp_path)
    config = build_config({"teacher": str(folder), "student_params": "2B"})
    plan = Plan(str(folder), "local", 6_738_415_616, 2_000_000_000, None, "", 4096, 1)
    assert teacher_hub_id(config, plan) is None and minima_export.teacher_license(config, plan) is None
    (folder / "config.json").write_text(json.dumps({**LLAMA2_7B_CONFIG, "_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    (folder / "README.md").write_text("---\nlicense: llama2\n---\n# Llama 2\n")
    assert teacher_hub_id(config, plan) == "meta-llama/Llama-2-7b-hf"
    assert minima_export.teacher_license(config, plan) == "llama2"
    (folder / "config.json").write_text(json.dumps({**LLAMA2_7B_CONFIG, "_name_or_path": str(folder)}))
    assert teacher_hub_id(config, plan) is None  # a saved local path is not a Hub id
    named = build_config(
        {"teacher": str(folder), "student_params": "2B", "teacher_hub_id": "me/teacher", "license": "mit"}
    )
    assert teacher_hub_id(named, plan) == "me/teacher" and minima_export.teacher_license(named, plan) == "mit"
