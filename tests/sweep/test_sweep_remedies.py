"""The sweep's capacity-gap remedies (issue 21): loss: taid with its schedule, chained cells through teacher
assistants built once and reused, the settings hash of existing ledgers unchanged, the law fitted from direct
cells only, and the public one-cell run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hf_capgap.errors import ConfigError
from hf_capgap.law import CapacityGapLaw
from hf_capgap.law.records import validated_records
from hf_capgap.sweep import SweepConfig, finished_records, plan, run_cell, run_sweep
from hf_capgap.sweep.assistants import ASSISTANT_SEED, ASSISTANTS_DIR
from hf_capgap.utils.artifacts import MANIFEST_NAME, ArtifactError, json_sha256

REPO = Path(__file__).resolve().parents[2]

DEFAULT_SETTINGS_SHA256 = "36d426ccb716e73c73140ddfe4e7654b75d15071ccc19f36434f04b044eadc79"
TINY_PRESET_SETTINGS_SHA256 = "88cb10eb9dc5434128ec95f17e33b411e2fe61cff718d65e6b358bac8d7d89bc"
"""json_sha256(config.settings()) of SweepConfig() and of recipes/configs/sweep_tiny.yaml, computed at commit
9da70c4 (before taid_* and assistants existed): a ledger made then must still be accepted."""

FAST = {"tokens_per_run": 2048, "eval_rows": 16, "calibration_rows": 16, "seq_len": 64, "learning_rate": 0.01}


def micro(tmp_path: Path, **overrides) -> SweepConfig:
    values = {"family": "micro", "student_sizes": ["21K", "25K"], "output_dir": str(tmp_path / "sweep")}
    return SweepConfig.from_dict({**values, **overrides})


# ---------------------------------------------------------------------- config


def test_settings_hash_of_existing_ledgers_is_unchanged():
    import yaml

    assert json_sha256(SweepConfig().settings()) == DEFAULT_SETTINGS_SHA256
    preset = yaml.safe_load((REPO / "recipes" / "configs" / "sweep_tiny.yaml").read_text())
    assert json_sha256(SweepConfig.from_dict(preset).settings()) == TINY_PRESET_SETTINGS_SHA256
    chained = SweepConfig.from_dict({**preset, "assistants": "auto", "assistant_tokens": 1_228_800})
    assert json_sha256(chained.settings()) == TINY_PRESET_SETTINGS_SHA256, "direct and chained cells share a ledger"


def test_taid_is_accepted_online_with_its_schedule_in_the_settings(tmp_path):
    config = micro(tmp_path, loss="taid", cache_mode="online", taid_t_start=0.1, taid_alpha=5e-3)
    settings = config.settings()
    assert (settings["loss"], settings["taid_t_start"], settings["taid_alpha"]) == ("taid", 0.1, 5e-3)
    assert {"taid_t_end", "taid_beta"} <= set(settings)
    assert not any(name.startswith("taid_") for name in micro(tmp_path, cache_mode="online").settings())
    other = micro(tmp_path, loss="taid", cache_mode="online", taid_t_start=0.2, taid_alpha=5e-3)
    assert json_sha256(other.settings()) != json_sha256(settings), "another schedule is another ledger"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"loss": "taid"}, "cache_mode='topk'"),
        ({"loss": "taid", "cache_mode": "sampled"}, "cache_mode='sampled'"),
        ({"loss": "taid", "cache_mode": "online", "taid_t_start": 1.0}, "taid_t_start"),
        ({"loss": "taid", "cache_mode": "online", "taid_alpha": 2.0}, "taid_alpha"),
        ({"assistants": ["auto", "60K"]}, "assistants"),
        ({"assistants": ["lots"]}, "lots"),
        ({"assistants": ["500K"]}, "500K"),
        ({"assistants": ["60K"], "assistant_tokens": 10}, "assistant_tokens"),
    ],
)
def test_bad_remedy_settings_are_refused_naming_the_field(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        micro(tmp_path, **overrides)
    assert not (tmp_path / "sweep").exists()


def test_plan_adds_chained_cells_beside_the_direct_ones(tmp_path):
    direct = [spec.run_id for spec in plan(micro(tmp_path))]
    assert direct == [spec.run_id for spec in plan(micro(tmp_path, assistants="none"))]
    listed = plan(micro(tmp_path, assistants=["60K"], teachers=["llama-30K", "llama-271K"]))
    chained = [spec for spec in listed if spec.assistants]
    assert [spec.run_id for spec in chained] == ["21K-from-llama-271K-via-60K", "25K-from-llama-271K-via-60K"]
    assert all(spec.assistants == (60_000,) for spec in chained), "the 30K teacher is below the assistant"
    auto = micro(tmp_path, assistants="auto", student_sizes=["21K"], assistant_tokens=4096, **FAST)
    teacher = auto.teacher_sizes()["llama-271K"]
    expected = tuple(round(size) for size in CapacityGapLaw.paper().chain(21_000, teacher).assistants)
    spec = next(spec for spec in plan(auto) if spec.assistants and spec.teacher == "llama-271K")
    assert spec.assistants == expected and len(expected) >= 1
    assert spec.run_id.endswith("-4096tok"), "assistants on another budget are another cell"
    assert not any(spec.assistants for spec in plan(auto) if spec.teacher == "llama-30K"), "within reach"


def test_taid_cells_have_their_own_run_ids_and_direct_ones_keep_theirs(tmp_path):
    direct = [spec.run_id for spec in plan(micro(tmp_path))]
    assert direct[:2] == ["21K-from-llama-30K", "25K-from-llama-30K"]
    taid = [spec.run_id for spec in plan(micro(tmp_path, loss="taid", cache_mode="online"))]
    assert taid == [f"{run_id}-taid" for run_id in direct], "the default schedule: one readable suffix"
    tuned = [spec.run_id for spec in plan(micro(tmp_path, loss="taid", cache_mode="online", taid_t_start=0.1))]
    other = [spec.run_id for spec in plan(micro(tmp_path, loss="taid", cache_mode="online", taid_t_start=0.2))]
    assert all(run_id.startswith(f"{plain}-taid-") for run_id, plain in zip(tuned, direct, strict=True))
    assert not set(tuned) & set(other) and not set(tuned) & set(taid), "another schedule is another cell"
    chained = micro(tmp_path, loss="taid", cache_mode="online", assistants=["60K"], teachers=["llama-271K"])
    assert [spec.run_id for spec in plan(chained) if spec.assistants][0] == "21K-from-llama-271K-via-60K-taid"


def test_status_never_shows_another_sweeps_cells_as_done(tmp_path):
    from hf_capgap.sweep import sweep_status
    from hf_capgap.sweep.ledger import LEDGER_FORMAT_VERSION, write_ledger

    direct = micro(tmp_path, cache_mode="online")
    sha = json_sha256(direct.settings())
    records = [
        {
            "run_id": spec.run_id,
            "format_version": LEDGER_FORMAT_VERSION,
            "student_params": spec.student_params,
            "teacher_params": spec.teacher_params,
            "eval_loss": 5.0,
            "settings_sha256": sha,
        }
        for spec in plan(direct)
    ]
    Path(direct.output_dir).mkdir(parents=True)
    write_ledger(direct.output_dir, records)
    assert {row["state"] for row in sweep_status(direct)} == {"done"}
    assert {row["state"] for row in sweep_status(micro(tmp_path, loss="taid", cache_mode="online"))} == {"left"}
    other = sweep_status(micro(tmp_path, cache_mode="online", learning_rate=0.5))
    assert {row["state"] for row in other} == {"foreign"} and {row["eval_loss"] for row in other} == {None}
    from hf_capgap.sweep import format_status

    assert "foreign" in format_status(other).splitlines()[-1]


@pytest.mark.parametrize("schedule", [{}, {"taid_t_start": 0.1}], ids=["default", "tuned"])
def test_taid_records_from_before_their_run_ids_ended_in_taid_are_found(tmp_path, schedule):
    """A TAID sweep's ledger written when its cells were named like direct ones: resumed, its cells are done."""
    from hf_capgap.sweep import sweep_status
    from hf_capgap.sweep.ledger import LEDGER_FORMAT_VERSION, write_ledger

    taid = micro(tmp_path, loss="taid", cache_mode="online", **schedule)
    direct_ids = [spec.run_id for spec in plan(micro(tmp_path, cache_mode="online"))]
    records = [
        {
            "run_id": run_id,
            "format_version": LEDGER_FORMAT_VERSION,
            "student_params": spec.student_params,
            "teacher_params": spec.teacher_params,
            "eval_loss": 5.0,
            "settings_sha256": json_sha256(taid.settings()),
            "settings": taid.settings(),
        }
        for run_id, spec in zip(direct_ids, plan(taid), strict=True)
    ]
    Path(taid.output_dir).mkdir(parents=True)
    write_ledger(taid.output_dir, records)
    assert [row["run_id"] for row in finished_records(taid.output_dir)] == [spec.run_id for spec in plan(taid)]
    assert {row["state"] for row in sweep_status(taid)} == {"done"}


def test_assistant_keys_and_run_ids_name_exact_sizes_and_the_teacher(tmp_path):
    from hf_capgap.sweep.assistants import assistant_dir

    config = micro(tmp_path, assistants=["60K"], teachers=["llama-271K"])
    key = assistant_dir(config, "llama-271K", (60_000,), "weights-a")
    assert key.name.startswith("llama-271K-to-60K-") and key.parent.name == ASSISTANTS_DIR
    others = {
        assistant_dir(config, "llama-271K", (60_040,), "weights-a"),
        assistant_dir(config, "llama-271K", (60_000,), "weights-b"),
        assistant_dir(dataclasses.replace(config, temperature=2.0), "llama-271K", (60_000,), "weights-a"),
    }
    assert key not in others and len(others) == 3
    assert assistant_dir(dataclasses.replace(config, cache_k=8), "llama-271K", (60_000,), "weights-a") == key
    assert [spec.run_id for spec in plan(config) if spec.assistants][0] == "21K-from-llama-271K-via-60K"
    exact = micro(tmp_path, assistants=["60040"], teachers=["llama-271K"])
    assert [spec.run_id for spec in plan(exact) if spec.assistants][0] == "21K-from-llama-271K-via-60040"


def test_each_pair_explicit_assistants_skip_is_logged_once(tmp_path, caplog):
    from hf_capgap.sweep.run import _log_unchained_pairs

    config = micro(tmp_path, assistants=["60K"], teachers=["llama-30K", "llama-86K"])
    with caplog.at_level("INFO", logger="hf_capgap.sweep.run"):
        _log_unchained_pairs(config, plan(config))
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and all("llama-30K" in line and "60K" in line for line in lines), lines
    caplog.clear()
    auto = micro(tmp_path, assistants="auto")
    with caplog.at_level("INFO", logger="hf_capgap.sweep.run"):
        _log_unchained_pairs(auto, plan(auto))
    assert not caplog.records, "auto plans no assistant where the teacher is within reach: nothing skipped"


# ---------------------------------------------------------------------- a micro sweep with an assistant


@pytest.fixture(scope="module")
def chained_sweep(tmp_path_factory, ladder_dir):
    """Two direct and two chained cells of one teacher, both through one 60K assistant (topk caches, as the micro
    preset's)."""
    root = tmp_path_factory.mktemp("remedies")
    config = SweepConfig.from_dict(
        {
            "family": "micro",
            "student_sizes": ["21K", "25K"],
            "teachers": ["llama-271K"],
            "assistants": ["60K"],
            "cache_k": 16,
            "output_dir": str(root / "sweep"),
            "ladder_dir": str(ladder_dir),
            **FAST,
        }
    )
    return config, run_sweep(config, progress=False)


def test_chained_cells_share_one_assistant_per_teacher_and_record_it(chained_sweep):
    config, records = chained_sweep
    out = Path(config.output_dir)
    assistants = sorted(path.name for path in (out / ASSISTANTS_DIR).iterdir())
    assert len(assistants) == 1 and assistants[0].startswith("llama-271K-to-60K-"), assistants
    assert sorted(path.name for path in (out / "caches").iterdir()) == sorted(["llama-271K", *assistants])
    by_id = {record["run_id"]: record for record in records}
    assert len(by_id) == 4
    teacher = "llama-271K"
    chained = [by_id[f"{student}-from-{teacher}-via-60K"] for student in ("21K", "25K")]
    direct = [by_id[f"{student}-from-{teacher}"] for student in ("21K", "25K")]
    first, second = (record["assistants"] for record in chained)
    assert first == second, "the second cell reads the assistant back, wall seconds and all"
    (entry,) = first
    manifest = json.loads((Path(entry["path"]) / MANIFEST_NAME).read_text())
    assert entry["eval_loss"] == manifest["eval_loss"] and entry["distilled_from"] == teacher
    assert abs(entry["student_params"] - 60_000) <= 0.02 * 60_000 and entry["tokens"] == config.tokens_per_run
    assert entry["wall_seconds"] > 0
    from hf_capgap.sweep.teachers import TeacherSource
    from hf_capgap.utils.artifacts import model_fingerprint

    model, _ = TeacherSource(config, teacher).load(teacher)
    assert manifest["chain"] == [60_000] and manifest["teacher_fingerprint"] == model_fingerprint(model)
    for chain, plain in zip(chained, direct, strict=True):
        assert chain["teacher_params"] == plain["teacher_params"] and chain["teacher"] == teacher
        assert chain["settings_sha256"] == plain["settings_sha256"] and chain["assistant_tokens"] == 2048
        assert "assistants" not in plain
    assert len(finished_records(out)) == 4


def test_law_fit_uses_the_direct_cells_only(chained_sweep):
    _, records = chained_sweep
    direct = [record for record in records if not record.get("assistants")]
    assert validated_records(records) == validated_records(direct) and len(direct) == 2
    with pytest.raises(ConfigError, match="chained"):
        validated_records([record for record in records if record.get("assistants")])


def test_run_cell_reproduces_the_sweep_and_reuses_assistants(chained_sweep):
    config, records = chained_sweep
    by_id = {record["run_id"]: record for record in records}
    direct = run_cell(dataclasses.replace(config, assistants=[]), "21K", "llama-271K")
    assert direct["run_id"] == "21K-from-llama-271K" and "assistants" not in direct
    assert direct["eval_loss"] == pytest.approx(by_id["21K-from-llama-271K"]["eval_loss"], rel=1e-6)
    assert direct["settings_sha256"] == by_id["21K-from-llama-271K"]["settings_sha256"]
    manifests = {
        path: path.read_bytes() for path in Path(config.output_dir).glob(f"{ASSISTANTS_DIR}/*/{MANIFEST_NAME}")
    }
    caches = Path(config.output_dir) / "caches"
    sweep_caches = {path: path.read_bytes() for path in caches.rglob("*") if path.is_file()}
    seed = ASSISTANT_SEED + 1
    chained = run_cell(config, "25K", "llama-271K", seed=seed)  # topk: the cache of another seed is its own
    assert chained["run_id"] == "25K-from-llama-271K-via-60K" and chained["settings"]["seed"] == seed
    assert chained["assistants"] == by_id["25K-from-llama-271K-via-60K"]["assistants"], "another seed, same assistant"
    assert {path: path.read_bytes() for path in manifests} == manifests, "nothing rebuilt"
    assert {path: path.read_bytes() for path in sweep_caches} == sweep_caches, "the sweep's caches are untouched"
    (assistant,) = chained["assistants"]
    assert (caches / f"{Path(assistant['path']).name}-seed{seed}").is_dir()
    assert not (caches / f"llama-271K-seed{seed}").exists(), "a chained cell never reads the big teacher's cache"
    assert len(finished_records(config.output_dir)) == 4, "run_cell leaves the ledger alone"
    assert [record["run_id"] for record in run_sweep(config, progress=False)] == list(by_id)
    within_reach = dataclasses.replace(config, teachers=[])
    with pytest.raises(ConfigError, match="assistants"):
        run_cell(within_reach, "21K", "llama-30K")
    (path,) = manifests
    stale = {**json.loads(manifests[path]), "teacher_fingerprint": "another teacher"}
    path.write_text(json.dumps(stale))
    try:
        with pytest.raises(ArtifactError, match="teacher_fingerprint"):
            run_cell(config, "21K", "llama-271K")
    finally:
        path.write_bytes(manifests[path])


def test_run_cell_refuses_a_pair_outside_the_grid_before_any_work(tmp_path, monkeypatch):
    import hf_capgap.sweep.run as run

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(run, "TeacherSource", no_work)
    config = micro(tmp_path, teachers=["llama-271K"], **FAST)
    for student, teacher in (
        ("23K", "llama-271K"),
        ("21K", "llama-86K"),
        ("21K", "llama-999K"),
        ("lots", "llama-271K"),
    ):
        with pytest.raises(ConfigError, match="21K-from-llama-271K, 25K-from-llama-271K"):
            run_cell(config, student, teacher)
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(AssertionError, match="work started"):
        run_cell(config, "21000", "llama-271K")  # the same size, written otherwise
