"""The one ledger reader: a torn last line is dropped with a warning, damage elsewhere is refused; the law keeps
the direct records of a mixed ledger (chained and TAID cells beside them), from a path or a DataFrame."""

from __future__ import annotations

import json

import pytest

from hf_capgap.errors import ConfigError
from hf_capgap.law import CapacityGapLaw, read_ledger
from hf_capgap.law.records import read_records, validated_records
from hf_capgap.utils.artifacts import ArtifactError
from tests.law.test_law import proportional, sweep


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return path


def test_the_law_fits_a_ledger_whose_last_line_a_kill_tore(tmp_path):
    records = sweep(proportional(2.5))
    ledger = _write(tmp_path / "ledger.jsonl", records, json.dumps(records[0])[:25])
    with pytest.warns(UserWarning, match="torn last line"):
        law = CapacityGapLaw.fit(str(ledger), n_bootstrap=200)
    assert law.ratio == pytest.approx(CapacityGapLaw.fit(records, n_bootstrap=200).ratio)
    assert len(law.records) == len(records)


def test_a_torn_line_in_the_middle_is_refused_naming_it(tmp_path):
    records = sweep(proportional(2.5))[:3]
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1])[:20] + "\n" + json.dumps(records[2]))
    with pytest.raises(ArtifactError, match="line 2 is not valid JSON"):
        read_ledger(ledger)


def test_a_bad_last_line_ended_by_a_newline_is_damage_not_a_kill(tmp_path):
    ledger = _write(tmp_path / "ledger.jsonl", sweep(proportional(2.5))[:2], "[1, 2]\n")
    with pytest.raises(ArtifactError, match="line 3 is not a JSON object"):
        read_ledger(ledger)


def test_required_fields_make_a_partial_object_a_non_record(tmp_path):
    ledger = _write(tmp_path / "ledger.jsonl", [{"run_id": "a", "eval_loss": 1.0}, {"eval_loss": 2.0}])
    with pytest.raises(ArtifactError, match="line 2 is not a sweep record .it lacks run_id"):
        read_ledger(ledger, required_fields=("run_id", "eval_loss"))
    assert read_ledger(ledger) == [{"run_id": "a", "eval_loss": 1.0}, {"eval_loss": 2.0}]


def test_a_missing_ledger_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sweep ledger"):
        read_ledger(tmp_path / "missing.jsonl")


def _mixed_ledger():
    """Direct records, each beside a chained and a TAID record of the same pair with a much lower loss."""
    direct = [{**record, "settings": {"loss": "forward_kl"}} for record in sweep(proportional(2.5))]
    chained = [{**record, "eval_loss": 0.0, "assistants": [{"student_params": 1.0}]} for record in direct]
    taid = [{**record, "eval_loss": 0.0, "settings": {"loss": "taid"}} for record in direct]
    return direct, [*direct, *chained, *taid]


def test_the_law_fits_only_the_direct_records_of_a_mixed_ledger():

    direct, mixed = _mixed_ledger()
    assert validated_records(mixed) == validated_records(direct)
    assert len(validated_records(direct)) == len(direct)
    with pytest.raises(ConfigError, match="taid"):
        validated_records(mixed[len(direct) :])


def test_a_dataframe_of_a_mixed_ledger_keeps_its_direct_records(tmp_path):
    pandas = pytest.importorskip("pandas")

    direct, mixed = _mixed_ledger()
    frame = pandas.DataFrame(mixed)  # a direct row's missing assistants reads back as NaN (truthy)
    assert validated_records(read_records(frame)) == validated_records(direct)
    ledger = _write(tmp_path / "ledger.jsonl", mixed)
    kept = validated_records(read_records(pandas.read_json(ledger, lines=True)))
    expected = validated_records(direct)
    assert [(row["student_params"], row["teacher_params"]) for row in kept] == [
        (row["student_params"], row["teacher_params"]) for row in expected
    ]
    assert [row["eval_loss"] for row in kept] == pytest.approx([row["eval_loss"] for row in expected], rel=1e-12)


def test_chained_records_whose_assistants_are_arrays_are_left_out():
    """A ledger DataFrame saved to parquet and read back holds each ``assistants`` list as a numpy array."""
    numpy = pytest.importorskip("numpy")
    direct, mixed = _mixed_ledger()
    as_arrays = [
        {**row, "assistants": numpy.array(row["assistants"], dtype=object)} if row.get("assistants") else row
        for row in mixed
    ]
    assert validated_records(as_arrays) == validated_records(direct)


def test_records_of_one_cell_made_with_other_settings_are_refused_naming_the_keys():
    records = sweep(proportional(2.5))
    off = [{**record, "settings": {"loss": "reverse_kl", "seed": 0}} for record in records]
    seeds = [{**record, "settings": {"loss": "reverse_kl", "seed": 1}} for record in records]
    law = CapacityGapLaw.fit(off + seeds, n_bootstrap=200)  # seeds of one sweep are repeats of its cells
    assert law.ratio == pytest.approx(CapacityGapLaw.fit(off, n_bootstrap=200).ratio)
    assert CapacityGapLaw.fit(off + records, n_bootstrap=200).ratio == pytest.approx(law.ratio), "no settings: pass"
    on = [{**record, "settings": {"loss": "reverse_kl", "seed": 0, "lmbda": 1.0, "top_k": 5}} for record in records]
    with pytest.raises(
        ConfigError, match=r"mixes runs made with other settings \(lmbda unset vs 1.0, top_k unset vs 5\)"
    ):
        validated_records(off + on)
    with pytest.raises(ConfigError, match="fit one sweep's ledger at a time"):
        CapacityGapLaw.fit(off + on, n_bootstrap=200)
