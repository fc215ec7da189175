"""CapacityGapLaw: recovery of known laws, queries, persistence, plotting, bad input and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from hf_capgap.cli import main
from hf_capgap.law import (
    CITATION,
    FORMAT_VERSION,
    CapacityGapLaw,
    CapacityGapWarning,
    TooFewOptimaError,
    format_params,
    parse_params,
    plot_measurements,
)
from hf_capgap.utils.artifacts import ArtifactError

STUDENTS = (70e6, 160e6, 410e6, 1e9, 1.4e9, 2.8e9)
LADDER = np.geomspace(5e7, 2e11, 19)


def sweep(optimum, students=STUDENTS, *, noise=0.0, seed=0, curvature=0.05):
    """Records from loss(s, t) = a(s) + c (log t - log t*(s))^2 + noise, on a log-spaced teacher ladder."""
    rng = np.random.default_rng(seed)
    records = []
    for student in students:
        floor = 2.0 + 10 / math.log(student)
        for teacher in LADDER[LADDER > 1.1 * student][:9]:
            gap = math.log(teacher) - math.log(optimum(student))
            records.append(
                {
                    "student_params": student,
                    "teacher_params": float(teacher),
                    "eval_loss": floor + curvature * gap**2 + float(rng.normal(0, noise)),
                    "family": "toy",
                }
            )
    return records


def proportional(k):
    return lambda s: k * s


@pytest.fixture(scope="module")
def noisy_law():
    return CapacityGapLaw.fit(sweep(proportional(3.1), noise=0.002, seed=3), n_bootstrap=500)


# ---------------------------------------------------------------------- fitting


def test_noiseless_sweep_recovers_every_optimum_and_the_ratio_exactly():
    law = CapacityGapLaw.fit(sweep(proportional(3.1)), n_bootstrap=200)
    assert law.ratio == pytest.approx(3.1, rel=1e-9)
    assert law.r2 == pytest.approx(1.0)
    assert law.source == "fitted"
    assert [optimum.student_params for optimum in law.optima] == list(STUDENTS)
    for optimum in law.optima:
        assert optimum.interior
        assert optimum.teacher_params == pytest.approx(3.1 * optimum.student_params, rel=1e-9)
        assert len(optimum.points_used) == 3
        assert optimum.points_used[0] < optimum.teacher_params < optimum.points_used[-1]


def test_vertex_lands_between_grid_points_where_the_argmin_cannot():
    law = CapacityGapLaw.fit(sweep(proportional(3.1)), n_bootstrap=200)
    grid_errors = []
    for optimum in law.optima:
        teachers = np.array(optimum.points_used)
        grid_best = teachers[np.argmin(np.abs(np.log(teachers / (3.1 * optimum.student_params))))]
        grid_errors.append(abs(math.log(grid_best / (3.1 * optimum.student_params))))
    assert max(grid_errors) > 0.05
    assert law.ratio == pytest.approx(3.1, rel=1e-9)


def test_noisy_sweep_recovers_the_ratio_and_the_interval_covers_it(noisy_law):
    assert noisy_law.ratio == pytest.approx(3.1, rel=0.05)
    lo, hi = noisy_law.ratio_ci
    assert lo < 3.1 < hi
    assert lo < noisy_law.ratio < hi
    assert hi / lo < 1.2
    assert 0.95 < noisy_law.r2 <= 1.0


def test_interval_covers_the_true_ratio_at_about_its_nominal_rate():
    laws = [
        CapacityGapLaw.fit(sweep(proportional(3.1), noise=0.005, seed=seed), n_bootstrap=200) for seed in range(40)
    ]
    covered = sum(law.ratio_ci[0] < 3.1 < law.ratio_ci[1] for law in laws)
    assert covered >= 35  # nominal 95% is 38 of 40; the plain percentile interval covers 32 here


def test_affine_fit_recovers_the_intercept_and_predicts_with_it():
    optimum = lambda s: 2.0 * s + 3e8  # noqa: E731
    law = CapacityGapLaw.fit(sweep(optimum), through_origin=False, n_bootstrap=200)
    assert law.slope_affine == pytest.approx(2.0, rel=1e-6)
    assert law.intercept == pytest.approx(3e8, rel=1e-6)
    assert law.r2_affine == pytest.approx(1.0)
    assert law.r2 < law.r2_affine
    assert law.predict(1e9).params == pytest.approx(2.3e9, rel=1e-6)
    assert law.student_for(2.3e9).params == pytest.approx(1e9, rel=1e-6)
    through_origin = CapacityGapLaw.fit(sweep(optimum), n_bootstrap=200)
    assert through_origin.intercept == pytest.approx(law.intercept)
    assert through_origin.predict(1e9).params == pytest.approx(through_origin.ratio * 1e9)


def test_ledger_path_dataframe_and_list_give_the_same_law(tmp_path):
    records = sweep(proportional(2.5), noise=0.002)
    ledger = tmp_path / "sweep.jsonl"
    ledger.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    pandas = pytest.importorskip("pandas")
    laws = [
        CapacityGapLaw.fit(source, n_bootstrap=200)
        for source in (records, ledger, str(ledger), pandas.DataFrame(records))
    ]
    for law in laws[1:]:
        assert law.ratio == laws[0].ratio
        assert law.ratio_ci == laws[0].ratio_ci
    assert laws[0].families == ("toy",)


def test_repeated_measurements_are_averaged():
    records = sweep(proportional(2.5))
    shifted = [{**r, "eval_loss": r["eval_loss"] + 0.01} for r in records]
    lowered = [{**r, "eval_loss": r["eval_loss"] - 0.01} for r in records]
    law = CapacityGapLaw.fit(shifted + lowered, n_bootstrap=200)
    assert law.ratio == pytest.approx(2.5, rel=1e-9)
    assert law.optima[0].loss == pytest.approx(CapacityGapLaw.fit(records, n_bootstrap=200).optima[0].loss)


# ---------------------------------------------------------------------- queries


def test_predict_is_vectorised_and_brackets_the_point(noisy_law):
    sizes = np.array([[1e8, 1e9], [3e9, 7e9]])
    prediction = noisy_law.predict(sizes)
    assert prediction.params.shape == sizes.shape
    np.testing.assert_allclose(prediction.params, noisy_law.ratio * sizes)
    assert np.all(prediction.lo < prediction.params) and np.all(prediction.params < prediction.hi)
    np.testing.assert_allclose(prediction.lo, noisy_law.ratio_ci[0] * sizes)
    scalar = noisy_law.predict(3e9)
    assert isinstance(scalar.params, float) and scalar.params == pytest.approx(prediction.params[1, 0])


@pytest.mark.parametrize("through_origin", [True, False])
def test_student_for_inverts_predict(through_origin):
    law = CapacityGapLaw.fit(sweep(proportional(2.8), noise=0.002), through_origin=through_origin, n_bootstrap=200)
    students = np.array([1e8, 1e9, 5e9])
    teachers = law.predict(students)
    back = law.student_for(teachers.params)
    np.testing.assert_allclose(back.params, students, rtol=1e-9)
    assert np.all(back.lo <= students) and np.all(students <= back.hi)


def test_suggest_measures_distance_in_log_space():
    law = CapacityGapLaw.paper()
    suggestion = law.suggest(3e9, [1e9, 3e9, 4e9, 13e9])
    # optimum 7.5B: 4B is nearer in parameters, but 13B is nearer as a ratio (1.73x vs 1.88x)
    assert suggestion.teacher_params == 13e9
    assert suggestion.choice.ratio == pytest.approx(13 / 3)
    assert suggestion.choice.log_distance == pytest.approx(math.log(13 / 7.5))
    assert [option.teacher_params for option in suggestion.alternatives] == [4e9]
    assert suggestion.alternatives[0].log_distance == pytest.approx(math.log(4 / 7.5))
    assert suggestion.excluded == (1e9, 3e9)
    assert suggestion.optimum.params == pytest.approx(7.5e9)
    for text in ("7.5B", "13B", "4B", "1B, 3B", "published"):
        assert text in suggestion.reason


def test_suggest_reports_whether_teachers_sit_inside_the_interval(noisy_law):
    best = noisy_law.predict(1e9).params
    suggestion = noisy_law.suggest("1B", [best * 1.01, best * 3])
    assert suggestion.choice.in_interval is True
    assert suggestion.alternatives[0].in_interval is False
    assert "inside the interval" in suggestion.reason and "fitted" in suggestion.reason


def test_suggest_refuses_when_no_teacher_is_larger_than_the_student():
    with pytest.raises(ValueError, match="no available teacher is larger than the 3B student"):
        CapacityGapLaw.paper().suggest(3e9, [1e9, 3e9])
    with pytest.raises(ValueError, match="available_teachers is empty"):
        CapacityGapLaw.paper().suggest(3e9, [])


def test_paper_prior_is_the_published_point_estimate():
    law = CapacityGapLaw.paper()
    assert law.ratio == 2.5 and law.ratio_ci is None and law.source == "paper"
    assert law.families == ("GPT-2", "Pythia")
    assert "arXiv:2311.07052" in law.citation and "Towards the Law of Capacity Gap" in law.citation
    prediction = law.predict(1e9)
    assert prediction.params == pytest.approx(2.5e9) and prediction.lo is None and prediction.hi is None
    assert law.student_for(7e9).params == pytest.approx(2.8e9)


@pytest.mark.parametrize("bad", [0, -1e9, float("nan"), [], "zero"])
def test_queries_reject_non_positive_sizes(bad):
    with pytest.raises(ValueError):
        CapacityGapLaw.paper().predict(bad)


# ---------------------------------------------------------------------- persistence


def test_to_dict_carries_the_model_card_fields(noisy_law):
    data = noisy_law.to_dict()
    for key in (
        "ratio",
        "ratio_ci",
        "intercept",
        "r2",
        "r2_affine",
        "source",
        "families",
        "n_students",
        "optima",
        "citation",
        "format_version",
    ):
        assert key in data
    assert data["ratio_ci"] == list(noisy_law.ratio_ci)
    assert data["n_students"] == len(STUDENTS)
    assert data["format_version"] == FORMAT_VERSION
    assert data["citation"] == CITATION
    json.dumps(data, allow_nan=False)


@pytest.mark.parametrize("make", ["fitted", "paper"])
def test_save_load_roundtrip(tmp_path, noisy_law, make):
    law = noisy_law if make == "fitted" else CapacityGapLaw.paper()
    path = tmp_path / "law.json"
    law.save(path)
    loaded = CapacityGapLaw.load(path)
    assert loaded.to_dict() == law.to_dict()
    sizes = np.array([1e8, 2e9])
    for original, copy in (
        (law.predict(sizes), loaded.predict(sizes)),
        (law.student_for(sizes), loaded.student_for(sizes)),
    ):
        np.testing.assert_array_equal(original.params, copy.params)
        if original.lo is not None:
            np.testing.assert_array_equal(original.lo, copy.lo)
            np.testing.assert_array_equal(original.hi, copy.hi)
    assert [p.name for p in tmp_path.iterdir()] == ["law.json"]


def test_load_refuses_another_format_version_and_foreign_files(tmp_path):
    path = tmp_path / "law.json"
    CapacityGapLaw.paper().save(path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match=f"format_version is {FORMAT_VERSION + 1}.*refit"):
        CapacityGapLaw.load(path)
    path.write_text(json.dumps({**data, "kind": "teacher_cache"}))
    with pytest.raises(ArtifactError, match="not a 'capacity_gap_law'"):
        CapacityGapLaw.load(path)
    path.write_text(json.dumps({key: value for key, value in data.items() if key != "ratio"}))
    with pytest.raises(ArtifactError, match=r"law\.json: the law lacks the field .ratio."):
        CapacityGapLaw.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a list"):
        CapacityGapLaw.load(path)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        CapacityGapLaw.load(path)
    with pytest.raises(FileNotFoundError, match="law fit"):
        CapacityGapLaw.load(tmp_path / "missing.json")


def _as_saved_by_method_1(law: CapacityGapLaw, path, **changes) -> dict:
    """``law`` as the previous hf_capgap saved it: no ``bootstrap.method``, every draw on the fitted line."""
    line = [law.ratio, 0.0] if law.through_origin else [law.slope_affine, law.intercept]
    data = law.to_dict() | {"ratio_ci": [law.ratio, law.ratio]}
    data["bootstrap"] = {
        "resampled": "student sizes (cases)",
        "interval": "expanded percentile",
        "percentiles": list(law.band_percentiles),
        "n": law.n_bootstrap,
        "seed": law.seed,
        "draws": [line] * law.n_bootstrap,
    }
    data.update(changes)
    path.write_text(json.dumps(data))
    return data


@pytest.mark.parametrize("through_origin", [True, False], ids=["origin", "affine"])
def test_a_law_saved_without_its_interval_method_gets_its_interval_recomputed(tmp_path, through_origin):
    optimum = lambda s: (2.0 if s < 2e8 else 3.0) * s  # noqa: E731
    with pytest.warns(CapacityGapWarning):
        law = CapacityGapLaw.fit(sweep(optimum, students=(1e8, 4e8)), n_bootstrap=200, through_origin=through_origin)
    path = tmp_path / "law.json"
    _as_saved_by_method_1(law, path)
    with pytest.warns(CapacityGapWarning, match=r"law\.json was saved with interval method 1.*recomputed"):
        loaded = CapacityGapLaw.load(path)
    assert loaded.to_dict() == law.to_dict()
    if through_origin:
        assert loaded.ratio_ci == pytest.approx((2.0, 3.0), rel=1e-9)
        assert loaded.suggest(1e8, [2.8e8]).choice.in_interval
    else:
        assert loaded.predict(1e8).lo is None
    loaded.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityGapWarning)
        assert CapacityGapLaw.load(path).to_dict() == law.to_dict()


def test_a_law_saved_without_its_interval_method_or_records_loads_with_a_warning(tmp_path, noisy_law):
    path = tmp_path / "law.json"
    _as_saved_by_method_1(noisy_law, path, records=[])
    with pytest.warns(CapacityGapWarning, match=r"law\.json was saved with interval method 1.*cannot be recomputed"):
        loaded = CapacityGapLaw.load(path)
    assert loaded.ratio_ci == (noisy_law.ratio, noisy_law.ratio)


# ---------------------------------------------------------------------- plotting


def _png_shape(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path).shape


def test_plot_writes_two_panels_for_a_fit_and_one_for_the_prior(tmp_path, noisy_law):
    fitted, prior = tmp_path / "fit.png", tmp_path / "prior.png"
    noisy_law.plot(fitted)
    CapacityGapLaw.paper().plot(prior)
    fit_height, fit_width, _ = _png_shape(fitted)
    prior_height, prior_width, _ = _png_shape(prior)
    assert fit_height == prior_height and fit_width == 2 * prior_width
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.png", "prior.png"]


def test_plot_marks_excluded_students(tmp_path):
    records = sweep(proportional(2.5)) + [
        {"student_params": 5e9, "teacher_params": t, "eval_loss": 3.0 - 0.01 * i}
        for i, t in enumerate((6e9, 8e9, 1e10))
    ]
    with pytest.warns(CapacityGapWarning):
        law = CapacityGapLaw.fit(records, n_bootstrap=200)
    assert [optimum.interior for optimum in law.optima].count(False) == 1
    law.plot(tmp_path / "law.png")
    height, width, _ = _png_shape(tmp_path / "law.png")
    assert width == pytest.approx(2.6 * height, rel=0.01)  # two 6.5 x 5 panels


# ---------------------------------------------------------------------- bad input


def _curve(student, teachers, best):
    """A loss curve over ``teachers`` with its minimum at teacher index ``best``."""
    return [
        {"student_params": student, "teacher_params": t, "eval_loss": 3.0 + 0.1 * abs(i - best)}
        for i, t in enumerate(teachers)
    ]


def test_edge_optimum_is_excluded_with_a_warning_naming_the_size():
    records = sweep(proportional(2.5)) + _curve(5e9, (6e9, 8e9, 1e10), best=2)
    with pytest.warns(
        CapacityGapWarning,
        match="student 5B: best teacher 10B is the largest tried; add teachers larger than it",
    ):
        law = CapacityGapLaw.fit(records, n_bootstrap=200)
    assert law.ratio == pytest.approx(2.5, rel=1e-9)
    excluded = [optimum for optimum in law.optima if not optimum.interior]
    assert [optimum.student_params for optimum in excluded] == [5e9]
    assert law.to_dict()["n_students"] == len(STUDENTS)
    assert "excluded" in law.summary()


def test_too_few_interior_optima_raise_with_every_reason():
    records = (
        _curve(1e8, (2e8, 3e8, 4e8), best=1) + _curve(1e9, (2e9, 3e9, 4e9), best=0) + _curve(2e9, (3e9, 4e9), best=1)
    )
    with pytest.raises(ValueError) as caught:
        CapacityGapLaw.fit(records, n_bootstrap=200)
    message = str(caught.value)
    assert "1 student size(s) have an interior optimum" in message
    assert "student 1B: best teacher 2B is the smallest tried; add teachers between 1B and 2B" in message
    assert "student 2B has 2 teacher size(s)" in message


def test_a_single_student_size_cannot_make_a_law():
    with pytest.raises(ValueError, match="needs at least 2"):
        CapacityGapLaw.fit(_curve(1e8, (2e8, 3e8, 4e8), best=1), n_bootstrap=200)


def test_few_student_sizes_warn_that_the_interval_is_coarse():
    with pytest.warns(CapacityGapWarning, match="coarse"):
        law = CapacityGapLaw.fit(sweep(proportional(2.5), students=STUDENTS[:3]), n_bootstrap=200)
    assert law.ratio == pytest.approx(2.5, rel=1e-9)


def test_two_student_sizes_give_an_interval_spanning_their_ratios():
    optimum = lambda s: (2.0 if s < 2e8 else 3.0) * s  # noqa: E731
    with pytest.warns(CapacityGapWarning, match="coarse"):
        law = CapacityGapLaw.fit(sweep(optimum, students=(1e8, 4e8)), n_bootstrap=200)
    assert law.ratio == pytest.approx(math.sqrt(6), rel=1e-9)
    lo, hi = law.ratio_ci
    assert lo == pytest.approx(2.0, rel=1e-9) and hi == pytest.approx(3.0, rel=1e-9)
    prediction = law.predict(1e8)
    assert (prediction.lo, prediction.hi) == pytest.approx((2e8, 3e8), rel=1e-9)
    suggestion = law.suggest(1e8, [2.2e8, 2.8e8, 5e8])
    assert [option.in_interval for option in (suggestion.choice, *suggestion.alternatives)] == [True, True, False]
    assert law.student_for(2.5e8).lo == pytest.approx(2.5e8 / 3.0)

    with pytest.warns(CapacityGapWarning) as caught:
        affine = CapacityGapLaw.fit(sweep(optimum, students=(1e8, 4e8)), n_bootstrap=200, through_origin=False)
    assert any("carries no interval" in str(warning.message) for warning in caught)
    assert affine.predict(1e8).lo is None and affine.ratio_ci == pytest.approx((lo, hi))


GOOD = {"student_params": 1e8, "teacher_params": 3e8, "eval_loss": 3.0}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"teacher_params": 3e8, "eval_loss": 3.0}, "record 0 lacks student_params"),
        ({**GOOD, "eval_loss": None}, "record 0 lacks eval_loss"),
        ({**GOOD, "student_params": 0}, "record 0: student_params: .*positive"),
        ({**GOOD, "teacher_params": -3e8}, "record 0: teacher_params: .*positive"),
        (
            {**GOOD, "teacher_params": 1e8},
            r"teacher_params \(100M\) must be larger than student_params \(100M\)",
        ),
        ({**GOOD, "eval_loss": float("nan")}, "student 100M, teacher 300M.*eval_loss is nan"),
        ({**GOOD, "eval_loss": "low"}, "eval_loss 'low' is not a number"),
    ],
)
def test_bad_records_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        CapacityGapLaw.fit([record, *sweep(proportional(2.5))], n_bootstrap=200)


def test_bad_sources_and_settings_fail_before_fitting(tmp_path):
    with pytest.raises(ValueError, match="no sweep records"):
        CapacityGapLaw.fit([])
    with pytest.raises(FileNotFoundError, match="no sweep ledger"):
        CapacityGapLaw.fit(tmp_path / "missing.jsonl")
    ledger = tmp_path / "broken.jsonl"
    ledger.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        CapacityGapLaw.fit(ledger)
    with pytest.raises(ValueError, match="n_bootstrap must be an integer of at least 100"):
        CapacityGapLaw.fit(sweep(proportional(2.5)), n_bootstrap=10)
    with pytest.raises(ValueError, match="not a single dict"):
        CapacityGapLaw.fit(GOOD)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3e9", 3e9),
        ("3B", 3e9),
        ("350M", 350e6),
        ("70m", 70e6),
        ("1.4b", 1.4e9),
        (" 7 B ", 7e9),
        (125, 125.0),
    ],
)
def test_parse_params_reads_model_name_sizes(text, value):
    assert parse_params(text) == pytest.approx(value)
    assert parse_params(format_params(value)) == pytest.approx(value, rel=1e-2)


@pytest.mark.parametrize("text", ["", "3x", "B", "-3B", "0", "nan"])
def test_parse_params_rejects_nonsense(text):
    with pytest.raises(ValueError, match="parameter count"):
        parse_params(text)


# ---------------------------------------------------------------------- CLI


def test_cli_fit_writes_law_and_plot_then_suggest_reads_it(tmp_path, capsys):
    ledger = tmp_path / "sweep.jsonl"
    ledger.write_text("\n".join(json.dumps(r) for r in sweep(proportional(3.1), noise=0.002, seed=3)))
    out, plot = tmp_path / "law.json", tmp_path / "law.png"
    assert main(["law", "fit", str(ledger), "--out", str(out), "--plot", str(plot), "--n-bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    law = CapacityGapLaw.load(out)
    assert f"t* = {law.ratio:.3g} x s" in printed and "95% CI" in printed and "R^2" in printed
    assert all(format_params(s) in printed for s in STUDENTS)
    assert _png_shape(plot)[1] > 0

    assert main(["law", "suggest", "--student", "1B", "--teachers", "1B,2B,3B,7B", "--law", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3B is the closest available teacher" in printed and "fitted law" in printed

    assert main(["law", "fit", str(ledger), "--out", str(out), "--affine", "--n-bootstrap", "200"]) == 0
    assert "predictions use the affine line" in capsys.readouterr().out
    assert not CapacityGapLaw.load(out).through_origin


def test_affine_law_with_a_negative_intercept_plots_where_it_is_valid(tmp_path, capsys):
    ledger = tmp_path / "sweep.jsonl"
    ledger.write_text("\n".join(json.dumps(r) for r in sweep(lambda s: 3.0 * s - 1e8, noise=0.001, seed=1)))
    out, plot = tmp_path / "law.json", tmp_path / "law.png"
    argv = ["law", "fit", str(ledger), "--out", str(out), "--affine", "--plot", str(plot), "--n-bootstrap", "200"]
    assert main(argv) == 0
    law = CapacityGapLaw.load(out)
    assert law.intercept < 0 and not law.through_origin
    assert _png_shape(plot)[1] > 0
    with pytest.raises(ValueError, match="no teacher larger"):
        law.predict(STUDENTS[0] / 1.5)  # the default plot range starts where this law is not defined
    law.plot(tmp_path / "marked.png", mark=(40e6, 150e6))
    assert _png_shape(tmp_path / "marked.png")[1] > 0


def test_cli_suggest_defaults_to_the_paper_prior(capsys):
    assert main(["law", "suggest", "--student", "350M"]) == 0
    assert "875M" in capsys.readouterr().out
    assert main(["law", "suggest", "--student", "3e9", "--teachers", "1e9,3e9,7e9,13e9"]) == 0
    assert "7B is the closest available teacher" in capsys.readouterr().out


def test_cli_reports_bad_input_and_writes_nothing(tmp_path, capsys):
    ledger = tmp_path / "sweep.jsonl"
    ledger.write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / "law.json"
    assert main(["law", "fit", str(ledger), "--out", str(out)]) == 2
    assert "interior optimum" in capsys.readouterr().err
    assert not out.exists()
    assert main(["law", "suggest", "--student", "3 bananas"]) == 2
    assert "3e9, 3B, 350M or 70m" in capsys.readouterr().err
    assert main(["law", "suggest", "--student", "1B", "--law", str(out)]) == 2


def test_cli_fit_that_cannot_bracket_still_plots_the_measured_curves(tmp_path, capsys):
    """Every optimum at the smallest teacher: no law, a clear error, and the curves to look at."""
    rows = [r for r in sweep(proportional(3.0)) if r["teacher_params"] >= 4 * r["student_params"]]
    ledger = tmp_path / "sweep.jsonl"
    ledger.write_text("\n".join(json.dumps(r) for r in rows))
    out, plot = tmp_path / "law.json", tmp_path / "curves.png"
    assert main(["law", "fit", str(ledger), "--out", str(out), "--plot", str(plot)]) == 2
    err = capsys.readouterr().err
    assert "is the smallest tried" in err and f"measured curves are in {plot}" in err
    assert not out.exists()
    assert _png_shape(plot)[1] > 0
    plot_measurements(rows, tmp_path / "direct.png")
    assert _png_shape(tmp_path / "direct.png") == _png_shape(plot)
    with pytest.raises(TooFewOptimaError, match="is the smallest tried"):
        CapacityGapLaw.fit(rows)


def test_law_runs_without_torch_in_a_fresh_interpreter(tmp_path):
    script = (
        "import sys\n"
        "import hf_capgap.law, hf_capgap.commands.law\n"
        "from hf_capgap.law import CapacityGapLaw\n"
        "law = CapacityGapLaw.paper()\n"
        f"law.save({str(tmp_path / 'law.json')!r}); CapacityGapLaw.load({str(tmp_path / 'law.json')!r})\n"
        "print(law.suggest(3e9, [7e9]).teacher_params)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7000000000.0"


def test_plot_can_mark_a_distilled_pair_far_from_the_default_range(tmp_path):
    path = tmp_path / "marked.png"
    CapacityGapLaw.paper().plot(path, mark=(5.8e5, 1.45e6))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_students_within_two_percent_are_one_size():
    """The same target pruned from different teachers gives slightly different exact counts."""
    records = [
        {"student_params": student * (1 + 0.004 * i), "teacher_params": teacher, "eval_loss": loss}
        for student, curve in (
            (1e8, [(1.5e8, 3.2), (2.5e8, 3.0), (5e8, 3.1)]),
            (4e8, [(6e8, 2.9), (1e9, 2.7), (2e9, 2.8)]),
        )
        for i, (teacher, loss) in enumerate(curve)
    ]
    law = CapacityGapLaw.fit(records, n_bootstrap=200)
    assert len(law.optima) == 2 and all(optimum.interior for optimum in law.optima)


def test_an_old_interval_that_cannot_be_recomputed_keeps_its_method_when_saved_again(tmp_path):
    data = CapacityGapLaw.fit(sweep(proportional(2.5)), n_bootstrap=200).to_dict()
    del data["bootstrap"]["method"]
    data["records"] = []
    with pytest.warns(CapacityGapWarning, match="cannot be recomputed"):
        law = CapacityGapLaw.from_dict(data)
    law.save(tmp_path / "law.json")
    assert json.loads((tmp_path / "law.json").read_text())["bootstrap"]["method"] == 1
    with pytest.warns(CapacityGapWarning, match="cannot be recomputed"):
        CapacityGapLaw.load(tmp_path / "law.json")
