"""Teacher assistants in the MiniMA recipe at micro scale: the setting and its refusals, a run through one
assistant (stage folders, results.json chain, card), resume after the assistant stage, the dry run's chain,
and loss: taid."""

from __future__ import annotations

import dataclasses
import json
import shutil
from itertools import pairwise
from pathlib import Path

import pytest

from hf_capgap.errors import ConfigError
from hf_capgap.minima import build_config, make_plan, parse_minima_args, run_minima
from hf_capgap.minima.dry_run import dry_run
from hf_capgap.minima.export import format_table
from tests.minima.test_minima import micro_values

# The micro ladder's 86K teacher (1 layer, 2 heads) prunes to few sizes: 60K and 22K are two of them.
ONE_ASSISTANT = {"assistants": "60K", "student_params": "22K", "run_name": "chained"}


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    config = build_config(micro_values(tmp_path_factory.mktemp("assistants"), **ONE_ASSISTANT))
    return config, run_minima(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"assistants": "20K,60K"}, "assistants='20K,60K' must list distinct sizes in decreasing order"),
        ({"assistants": "60K,60K"}, "distinct sizes in decreasing order"),
        ({"assistants": "many"}, "'many' is not a size"),
        ({"assistants": "100K"}, "100K is not strictly between the student (22K) and the teacher (86.2K)"),
        ({"assistants": "20K"}, "20K is not strictly between"),
        ({"assistants": "40K"}, "assistant 1 (40K) cannot be pruned from the model above it"),
        # the chain must shrink: no assistant of the teacher's (or the previous assistant's) achieved size, and no
        # student cut from the last assistant at that assistant's own size
        ({"assistants": "86K"}, "assistant 1 (86K) prunes to 86,208 parameters, not strictly between the student"),
        ({"assistants": "60K,59.5K"}, "assistant 2 (59.5K) prunes to 60,096 parameters, not strictly between"),
        ({"assistants": "22.1K"}, "the student prunes to 22,112 parameters from the last assistant (22,112)"),
        ({"assistant_tokens": "10"}, "assistant_tokens=10 is less than one optimizer step"),
        ({"assistant_tokens": "lots"}, "assistant_tokens='lots' is not a count"),
        ({"prune_only": True}, "prune_only skips"),
        ({"loss": "taid", "teacher_cache": True}, "cache_mode='topk' does not keep"),
        ({"loss": "taid", "teacher_cache": True, "cache_mode": "sampled"}, "cache_mode='sampled' does not keep"),
        ({"loss": "taid", "taid_t_start": 1.5}, "taid_t_start=1.5 must be in [0, 1)"),
        ({"loss": "kl"}, "loss='kl' must be one of forward_kl, reverse_kl, jsd, skew_kl, tvd, taid"),
    ],
)
def test_assistant_and_taid_settings_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        make_plan(build_config(micro_values(tmp_path, **{**ONE_ASSISTANT, **overrides})))
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_assistant_sizes_from_a_list_yaml_or_auto(tmp_path):
    preset = tmp_path / "run.yaml"
    preset.write_text("assistants: [300K, 1.5e5]\nassistant_tokens: 2048\n")
    config = parse_minima_args([str(preset)])
    assert config.assistant_sizes == (300_000.0, 150_000.0)
    assert config.assistant_token_count == 2048
    assert "assistants" not in config.result_settings()  # the identity needs the planned chain (run_settings)
    assert config.result_settings((300_000, 150_000))["assistant_tokens"] == 2048
    assert parse_minima_args(["--assistants", "300K,150K"]).assistant_sizes == (300_000.0, 150_000.0)
    plan = make_plan(build_config(micro_values(tmp_path, **ONE_ASSISTANT)))
    (assistant,) = plan.assistants
    assert (assistant.name, assistant.target_params, assistant.params, assistant.tokens) == (
        "assistant-1",
        60_000.0,
        60_096,  # the shape pruning picks from the teacher holds this many (within 2% of 60K)
        1024,  # assistant_tokens defaults to the student's train_tokens
    )
    auto = make_plan(build_config({"teacher": "llama-963K", "student_params": "110K", "assistants": "auto"}))
    assert [round(a.target_params) for a in auto.assistants] == [467_365, 226_738]  # CapacityGapLaw.paper().chain
    assert all(abs(a.params - a.target_params) / a.target_params <= 0.02 for a in auto.assistants)
    within_reach = make_plan(build_config({"teacher": "llama-418K", "student_params": "170K", "assistants": "auto"}))
    assert within_reach.assistants == ()


def test_none_keeps_the_settings_and_plan_of_a_run_without_assistants(tmp_path):
    config = build_config(micro_values(tmp_path))
    assert config.assistants == "none"
    settings = config.result_settings()
    assert not {"assistants", "assistant_tokens", "taid_t_start", "taid_alpha"} & set(settings)
    assert make_plan(config).assistants == ()
    taid = build_config(micro_values(tmp_path, loss="taid")).result_settings()
    assert taid["taid_t_start"] == 0.4 and "assistants" not in taid


def test_run_through_one_assistant(chained):
    from huggingface_hub import ModelCard

    config, results = chained
    work = config.work_dir
    assert len(list(work.glob("pruned-*"))) == 2 and len(list(work.glob("distilled-*"))) == 2
    assert not list(work.glob("distill-*"))  # each stage's checkpoints went once it was published
    teacher, assistant, student = results["chain"]
    assert [step["role"] for step in results["chain"]] == ["teacher", "assistant", "student"]
    assert (teacher["name"], teacher["params"], teacher["train_tokens"]) == ("llama-86K", 86_208, None)
    assert teacher["loss"] == results["eval"]["teacher"]["loss"]
    assert (assistant["params"], assistant["train_tokens"]) == (60_096, 1024)
    assert assistant["wall_seconds"] > 0 and student["wall_seconds"] > 0
    assert (student["params"], student["loss"]) == (
        results["eval"]["distilled"]["params"],
        results["eval"]["distilled"]["loss"],
    )
    assert abs(student["params"] - 22_000) / 22_000 <= 0.02
    assert set(results) - {"chain"} == set(json.loads((config.run_dir / "results.json").read_text())) - {"chain"}
    table = format_table(results)
    assert f"distilled through assistants: 86.2K ({teacher['loss']:.4f}) -> 60.1K ({assistant['loss']:.4f})" in table
    assert "the assistants trained on 1,024 tokens" in table
    card = ModelCard.load(config.run_dir / "README.md")
    assert "Distilled through assistants: 86.2K -> 60.1K -> 22.1K" in card.text
    assert f"| assistant-1 | assistant | 60,096 | {assistant['loss']:.4f} | 1,024 |" in card.text
    assert card.data.base_model is None  # the original teacher is a ladder rung (no Hub id), never an assistant
    assert str(config.output_dir) not in card.text and ".work" not in card.text


def test_rerun_after_the_assistant_stage_resumes_at_the_student(chained, monkeypatch):
    """A run stopped after its assistant was distilled prunes and distils only the student on the rerun."""
    from transformers import Trainer

    config, results = chained
    (student_pruned,) = [p for p in config.work_dir.glob("pruned-*") if _manifest(p)["teacher_name"] == "assistant-1"]
    (student_distilled,) = [p for p in config.work_dir.glob("distilled-*") if _shape(p) == _shape(student_pruned)]
    for folder in (config.run_dir, student_pruned, student_distilled):
        shutil.rmtree(folder)
    trained = []
    original = Trainer.train

    def train(self, *args, **kwargs):
        trained.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    again = run_minima(config)
    assert trained == ["DistillationTrainer"]  # the student only: the assistant and the baseline were finished
    assert student_pruned.is_dir() and student_distilled.is_dir()  # the same inputs, so the same folders
    assert again["chain"][:2] == results["chain"][:2]  # the assistant's record is read back, not retrained
    assert again["chain"][2]["params"] == results["chain"][2]["params"]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "capgap_manifest.json").read_text())


def _shape(folder: Path) -> tuple[int, int, int]:
    saved = json.loads((folder / "config.json").read_text())
    return saved["hidden_size"], saved["num_hidden_layers"], saved["intermediate_size"]


def test_dry_run_lists_the_chain_with_each_stage(tmp_path):
    config = build_config({"teacher": "llama-963K", "student_params": "110K", "assistants": "auto", "dry_run": True})
    report = dry_run(config)
    summary = report["summary"]
    assert "chain    963K -> 466K -> 226K -> 110K" in summary
    assert "assistant-1  from llama-963K (963,360 params): 466,304 params" in summary
    assert "student      from assistant-2 (226,160 params): 109,968 params" in summary
    assert {"assistant-1: distill", "assistant-2: prune (Taylor scores, one process)", "distill"} <= set(
        report["memory"]
    )
    assert [stage["tokens"] for stage in report["chain"]] == [409_600] * 3
    direct = dry_run(build_config({"teacher": "llama-963K", "student_params": "110K", "dry_run": True}))
    assert "chain" not in direct["summary"] and len(direct["chain"]) == 1


def test_taid_settings_reach_the_distillation_config(tmp_path):
    from hf_capgap.minima.distill import _distill_arguments

    config = build_config(micro_values(tmp_path, loss="taid", taid_t_start=0.3, taid_alpha=0.0, taid_beta=0.9))
    args = _distill_arguments(config, make_plan(config), tmp_path / "checkpoints", None)
    assert (args.loss, args.taid_t_start, args.taid_t_end, args.taid_alpha, args.taid_beta) == (
        "taid",
        0.3,
        1.0,
        0.0,
        0.9,
    )
    dense = build_config(micro_values(tmp_path, loss="taid", teacher_cache=True, cache_mode="dense"))
    assert dense.result_settings()["loss"] == "taid"  # a dense cache serves TAID


def test_a_multi_process_launch_with_assistants_is_refused_naming_the_single_process_constraint(tmp_path, monkeypatch):
    """--prune_only and --student_init (the way around a multi-process prune) are refused with assistants, so the
    refusal and the dry run's note name the real constraint instead."""
    with pytest.raises(ConfigError) as info:
        make_plan(build_config(micro_values(tmp_path, **ONE_ASSISTANT)), processes=2)
    assert "assistants need a single-process launch (each assistant is pruned in this run)" in str(info.value)
    assert "set assistants: none" in str(info.value) and "prune_only" not in str(info.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = dry_run(build_config(micro_values(tmp_path, **ONE_ASSISTANT, dry_run=True)))["summary"]
    assert "note     assistants need a single-process launch" in summary and "--prune_only" not in summary


def test_the_run_identity_is_the_planned_chain_not_the_assistants_text(tmp_path):
    from hf_capgap.minima.plan import run_settings

    def identity(**values):
        config = build_config(values)
        return run_settings(config, make_plan(config))

    one = identity(**micro_values(tmp_path, **ONE_ASSISTANT))
    assert one["assistants"] == [60_096] and one["assistant_tokens"] == 1024
    assert identity(**micro_values(tmp_path, **{**ONE_ASSISTANT, "assistants": "60000"})) == one
    assert identity(**micro_values(tmp_path, **{**ONE_ASSISTANT, "assistants": [" 60K "]})) == one
    big = {"teacher": "llama-963K", "student_params": "110K"}
    spaced = identity(**big, assistants="300K, 150K")
    assert spaced == identity(**big, assistants="300K,150K") and len(spaced["assistants"]) == 2
    # 'auto' with the teacher within reach plans no assistant: the identity of a run without assistants
    within = {"teacher": "llama-418K", "student_params": "170K"}
    assert identity(**within, assistants="auto") == identity(**within)


def test_auto_snaps_an_unprunable_planned_size_to_the_nearest_shape_within_the_law(tmp_path):
    """The law plans 43.5K between the micro 86K teacher and a 22K student; no shape of the teacher holds it
    (one head holds 20.7K-39.0K, two heads 49.5K-86.2K), so the nearest prunable size within the law is used."""
    from hf_capgap.minima.plan import load_law

    config = build_config(micro_values(tmp_path, assistants="auto", student_params="22K"))
    plan = make_plan(config)
    (assistant,) = plan.assistants
    assert round(assistant.target_params) == 43_550 and assistant.params == 39_008
    assert assistant.shape["num_attention_heads"] == 1
    bound = load_law(config).ratio  # the paper prior: no interval, k = 2.5
    assert plan.teacher_params / assistant.params <= bound and assistant.params / plan.student_params <= bound


def _achieved_sizes(config, plan) -> list[int]:
    """Teacher, assistants, and the student at the size pruning gives it from the last assistant (each assistant
    cut from the one above it)."""
    from hf_capgap.minima.plan import ladder_rungs, resolve_teacher
    from hf_capgap.pruning import PruneShape, shape_for_target
    from hf_capgap.pruning.layouts import meta_model, pruned_config, shape_params
    from hf_capgap.utils.parameters import count_model_parameters

    above = resolve_teacher(config, config.teacher, ladder_rungs(config))[1]
    sizes = [count_model_parameters(above)]
    for assistant in plan.assistants:
        shape = PruneShape.from_value(assistant.shape)
        assert shape_params(above, shape) == assistant.params  # prunable from the model above it
        above = meta_model(pruned_config(above.config, shape))
        sizes.append(count_model_parameters(above))
    return [*sizes, shape_params(above, shape_for_target(above, plan.student_params))]


@pytest.mark.parametrize(
    "values",
    [
        # the micro teacher's one-head shapes (20.7K-39.0K) hold these students, its two-head ones (49.5K-86.2K)
        # cannot give them: the planned ~44K-51K assistant must be a one-head shape, not the nearest prunable size
        {"teacher": "llama-86K", "student_params": "22.5K"},
        {"teacher": "llama-86K", "student_params": "30K"},
        # the embedded 963K teacher: students that its law-planned assistants could not give (review repros)
        {"teacher": "llama-963K", "student_params": "60K"},
        {"teacher": "llama-963K", "student_params": "100K"},
    ],
)
def test_auto_plans_a_chain_whose_every_step_is_within_the_law(tmp_path, values):
    from hf_capgap.minima.plan import load_law

    values = {**values, "assistants": "auto"}
    config = build_config(micro_values(tmp_path, **values) if values["teacher"] == "llama-86K" else values)
    plan = make_plan(config)
    assert len(plan.assistants) == len(load_law(config).chain(plan.student_params, plan.teacher_params).assistants)
    sizes = _achieved_sizes(config, plan)
    assert sizes[:-1] == [plan.teacher_params, *(a.params for a in plan.assistants)]
    assert abs(sizes[-1] - plan.student_params) <= 0.02 * plan.student_params
    assert all(above > below for above, below in pairwise(sizes))  # strictly decreasing
    bound = load_law(config).ratio  # the paper prior: no interval, k = 2.5
    assert max(above / below for above, below in pairwise(sizes)) <= bound * (1 + 1e-9)


def test_auto_without_a_chain_is_refused_in_its_own_terms_with_student_sizes_that_plan():
    """963K down to 65K takes two assistants by the law, and no two prunable shapes give a 65K student (its
    shapes need two layers and a wide MLP, so every model above it must be wider than 2.5 x 65K allows)."""
    with pytest.raises(ConfigError) as info:
        make_plan(build_config({"teacher": "llama-963K", "student_params": "65K", "assistants": "auto"}))
    message = str(info.value)
    assert message.startswith(
        "assistants='auto': no chain of prunable assistants from the 963K teacher to the 65K student keeps every "
        "step within the law's bound (the point estimate k = 2.5 (the paper reports no interval)); try a nearby "
        "student size (58.5K, 71.5K, 52K, 78K), an explicit list (assistants: 300K,150K), or assistants: none."
    )
    assert "Choose other assistant sizes" not in message
    for size in ("58.5K", "71.5K"):  # the sizes it names do plan
        plan = make_plan(build_config({"teacher": "llama-963K", "student_params": size, "assistants": "auto"}))
        assert plan.assistants


def test_auto_within_reach_reuses_a_finished_direct_run(chained, tmp_path, monkeypatch):
    from transformers import Trainer

    ladder = {"ladder_dir": chained[0].ladder_dir, "student_params": "49.9K", "run_name": "direct", "baseline": False}
    direct = run_minima(build_config(micro_values(tmp_path, **ladder)))
    auto = build_config(micro_values(tmp_path, **ladder, assistants="auto"))
    assert make_plan(auto).assistants == ()
    shutil.rmtree(auto.run_dir)  # only the export is redone: every stage folder has the direct run's identity

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(Trainer, "train", refuse)
    again = run_minima(auto)
    assert "chain" not in again and again == direct


def test_a_chain_written_otherwise_is_the_same_run_and_new_assistant_tokens_retrain_the_chain_only(
    chained, monkeypatch
):
    """Runs last in this file: it replaces the chained fixture's export."""
    from transformers import Trainer

    config, results = chained
    trained = []
    original = Trainer.train

    def train(self, *args, **kwargs):
        trained.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    same = build_config({**dataclasses.asdict(config), "assistants": "60000"})
    exported = json.loads((config.run_dir / "results.json").read_text())
    assert run_minima(same) == exported and trained == []  # the finished export is this run
    more = build_config({**dataclasses.asdict(config), "assistant_tokens": 2048})
    shutil.rmtree(more.run_dir)
    retrained = run_minima(more)
    # the assistant and the student again, not the from-scratch baseline (its architecture did not change)
    assert trained == ["DistillationTrainer", "DistillationTrainer"]
    assert retrained["chain"][1]["train_tokens"] == 2048 and retrained["settings"]["assistant_tokens"] == 2048
    assert retrained["eval"]["scratch"] == results["eval"]["scratch"]
