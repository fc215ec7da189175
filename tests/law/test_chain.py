"""CapacityGapLaw.chain: teacher-assistant sizes between a teacher too big and its student, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hf_capgap.cli import main
from hf_capgap.errors import ConfigError
from hf_capgap.law import CapacityGapLaw, CapacityGapWarning, ChainPlan


def fitted(ratio=2.93, ratio_ci=(2.39, 3.59)):
    return CapacityGapLaw(ratio=ratio, ratio_ci=ratio_ci, source="fitted")


def affine(slope, intercept, band_draws=None):
    return CapacityGapLaw(
        ratio=slope,
        ratio_ci=None,
        source="fitted",
        through_origin=False,
        slope_affine=slope,
        intercept=intercept,
        band_draws=band_draws,
        band_percentiles=None if band_draws is None else (2.5, 97.5),
    )


def upper_bound(law, students):
    prediction = law.predict(np.asarray(students, dtype=float))
    return prediction.params if prediction.hi is None else prediction.hi


def assert_fewest_equal_steps_within(law, plan: ChainPlan):
    """Equal ratios multiplying to teacher/student, each step within the bound, and one step fewer is not."""
    sizes = np.array(plan.sizes)
    assert np.all(np.diff(sizes) < 0)
    np.testing.assert_allclose(sizes[:-1] / sizes[1:], plan.ratios, rtol=1e-12)
    assert len(set(plan.ratios)) == 1
    assert math.prod(plan.ratios) == pytest.approx(plan.teacher / plan.student, rel=1e-12)
    assert np.all(sizes[:-1] <= upper_bound(law, sizes[1:]) * (1 + 1e-9))
    np.testing.assert_allclose(plan.limits, upper_bound(law, sizes[1:]) / sizes[1:], rtol=1e-12)
    steps = len(plan.ratios)
    if steps > 1:
        ratio = (plan.teacher / plan.student) ** (1 / (steps - 1))
        fewer = plan.student * ratio ** np.arange(steps - 1)
        assert np.any(ratio * fewer > upper_bound(law, fewer))


@pytest.mark.parametrize("teacher", ["1.1B", "2B", "2.5B"])
def test_a_teacher_within_reach_needs_no_assistant(teacher):
    plan = CapacityGapLaw.paper().chain("1B", teacher)
    assert plan.within_reach and plan.assistants == ()
    assert plan.sizes == (float(teacher[:-1]) * 1e9, 1e9)


def test_70b_to_1b_under_the_paper_prior_takes_five_equal_steps_within_k():
    law = CapacityGapLaw.paper()
    plan = law.chain(1e9, 70e9)
    assert not plan.within_reach
    assert len(plan.assistants) == 4 and len(plan.ratios) == 5  # ceil(log 70 / log 2.5) = 5
    assert plan.ratios[0] == pytest.approx(70 ** (1 / 5)) and plan.ratios[0] <= 2.5
    assert plan.limits == (2.5,) * 5
    assert (plan.teacher, plan.student) == (70e9, 1e9)
    assert "point estimate k = 2.5" in plan.bound and "paper" in plan.law
    assert_fewest_equal_steps_within(law, plan)


def test_a_ratio_equal_to_a_power_of_k_up_to_rounding_takes_exactly_that_many_steps():
    assert len(CapacityGapLaw.paper().chain(1e9, 2.5**2 * 1e9).ratios) == 2
    assert len(CapacityGapLaw.paper().chain(1e9, 2.5**3 * 1e9).ratios) == 3


def test_a_fitted_through_origin_law_steps_up_to_its_intervals_upper_end():
    law = fitted()
    within = law.chain("1B", "3.5B")  # above the point estimate 2.93 but inside the interval
    assert within.within_reach and within.assistants == ()
    for teacher in (4e9, 13e9, 14e9, 70e9, 1e12):
        plan = law.chain(1e9, teacher)
        assert len(plan.ratios) == math.ceil(math.log(teacher / 1e9) / math.log(3.59))
        assert_fewest_equal_steps_within(law, plan)
    assert "upper end of k's interval [2.39, 3.59]" in law.chain(1e9, 70e9).bound


def test_an_affine_law_holds_each_step_to_its_line_at_that_steps_student():
    law = affine(3.0, -1e8)
    plan = law.chain("1B", "70B")
    assert len(plan.assistants) == 3
    assert plan.limits == tuple(sorted(plan.limits, reverse=True))  # the allowed ratio shrinks with size here
    assert_fewest_equal_steps_within(law, plan)


def test_an_affine_law_with_a_band_uses_the_bands_upper_end():
    rng = np.random.default_rng(0)
    draws = np.column_stack([rng.normal(0.61, 0.05, 200), rng.normal(379e3, 20e3, 200)])
    law = affine(0.61, 379e3, draws)
    plan = law.chain("110K", "600K")
    assert plan.assistants and "bootstrap band" in plan.bound
    assert all(limit >= ratio for limit, ratio in zip(plan.limits, plan.ratios, strict=True))
    assert_fewest_steps_within(law, plan)


def test_an_affine_law_refuses_sizes_outside_its_valid_range():
    with pytest.raises(ConfigError, match=r"chain from 1B down to 40M .* outside the range"):
        affine(3.0, -1e8).chain("40M", "1B")  # 3 x 40M - 100M = 20M: no teacher larger than the student
    with pytest.raises(ConfigError, match=r"chain from 70B down to 110K .* outside the range"):
        affine(0.61, 379e3).chain("110K", "70B")  # valid only below 379K / 0.39 = 972K
    with pytest.raises(ConfigError, match="no chain of at most 64 steps"):
        CapacityGapLaw.paper().chain(1, 1e27)  # 2.5 ** 64 = 3.4e25


def test_an_affine_law_near_the_end_of_its_range_gets_unequal_steps_with_a_warning():
    law = affine(0.61, 379e3)  # valid only below 379K / 0.39 = 972K; allowed ratios tend to 1 near there
    with pytest.warns(CapacityGapWarning, match="near the end of its range"):
        plan = law.chain("110K", "963K")
    assert len(plan.ratios) == 10 and len(set(plan.ratios)) > 1
    assert_fewest_steps_within(law, plan)


def test_an_affine_law_takes_the_fewest_steps_when_equal_ones_need_more():
    law = affine(1.2, 500e6)
    plan = law.chain("100M", "70B")
    assert len(plan.ratios) == 19  # equal steps would need 35
    assert_fewest_steps_within(law, plan)


def assert_fewest_steps_within(law, plan: ChainPlan):
    """Sizes falling to the student, each step within the bound, and as few steps as a greedy climb takes."""
    sizes = np.array(plan.sizes)
    assert np.all(np.diff(sizes) < 0)
    np.testing.assert_allclose(sizes[:-1] / sizes[1:], plan.ratios, rtol=1e-12)
    assert np.all(sizes[:-1] <= upper_bound(law, sizes[1:]) * (1 + 1e-9))
    np.testing.assert_allclose(plan.limits, upper_bound(law, sizes[1:]) / sizes[1:], rtol=1e-12)
    size, steps = plan.student, 0
    while size < plan.teacher * (1 - 1e-12):
        size, steps = min(plan.teacher, float(upper_bound(law, [size])[0])), steps + 1
    assert len(plan.ratios) == steps


@pytest.mark.parametrize(
    "ratio_ci", [(2.0, float("nan")), (float("-inf"), 3.0), (2.0, float("inf")), (3.5, 2.0)], ids=str
)
def test_an_interval_that_is_not_finite_or_swapped_is_refused_where_the_law_is_built(ratio_ci):
    with pytest.raises(ConfigError, match=r"interval of k must be two finite numbers, low before high"):
        fitted(ratio=2.5, ratio_ci=ratio_ci)


def test_a_law_file_with_a_swapped_interval_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "law.json"
    fitted().save(path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "ratio_ci": [3.5, 2.0]}))
    with pytest.raises(ConfigError, match=r"law\.json: the law's interval of k"):
        CapacityGapLaw.load(path)


def test_a_non_finite_k_is_refused():
    with pytest.raises(ConfigError, match="ratio k must be a finite number"):
        CapacityGapLaw(ratio=float("nan"), ratio_ci=None, source="fitted")


@pytest.mark.parametrize(("ratio", "ratio_ci"), [(1.0, None), (0.8, (0.5, 0.9)), (0.9, (0.5, 1.0))])
def test_a_step_bound_not_above_1_is_refused_naming_the_interval(ratio, ratio_ci):
    interval = "no interval" if ratio_ci is None else rf"interval \[{ratio_ci[0]:.3g}, {ratio_ci[1]:.3g}\]"
    with pytest.raises(ConfigError, match=rf"k = {ratio:.3g}, {interval}\) allows .* a finite bound above 1"):
        fitted(ratio=ratio, ratio_ci=ratio_ci).chain("1B", "70B")


def test_a_point_estimate_above_its_interval_bounds_the_steps():
    law = fitted(ratio=2.5, ratio_ci=(1.5, 2.0))  # a percentile bootstrap interval can miss its estimate
    plan = law.chain("1B", "70B")
    assert len(plan.ratios) == 5 and plan.limits == (2.5,) * 5
    assert "point estimate k = 2.5, above its interval [1.5, 2]" in plan.bound


def test_a_band_that_is_not_finite_is_refused():
    draws = np.array([[0.61, 379e3], [float("nan"), 379e3]] * 50)
    with pytest.raises(ConfigError, match="no finite upper bound"):
        affine(0.61, 379e3, draws).chain("110K", "600K")


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        ("1B", "1B", "must be smaller than the teacher"),
        ("2B", "1B", "must be smaller than the teacher"),
        (0, "1B", "positive number"),
        (-1e9, "1B", "positive number"),
        (float("nan"), "1B", "positive number"),
        ("1B", float("inf"), "positive number"),
        ("a lot", "1B", "cannot read"),
    ],
)
def test_bad_sizes_are_refused_with_the_reason(student, teacher, message):
    with pytest.raises(ConfigError, match=message):
        CapacityGapLaw.paper().chain(student, teacher)


def test_cli_prints_one_line_per_model_and_the_law_it_used(capsys):
    assert main(["law", "chain", "--student", "1B", "--teacher", "70B"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert lines[0].split() == ["70B", "teacher"]
    assert lines[1].split()[:3] == ["29.9B", "assistant", "1"] and "ratio 2.34" in lines[1]
    assert lines[5].split()[:2] == ["1B", "student"] and "distilled from 2.34B, ratio 2.34" in lines[5]
    assert all("the law allows up to 2.5" in line for line in lines[1:6])
    assert lines[6] == (
        "law: paper, t* = 2.5 x s; a step may go up to the point estimate k = 2.5 (the paper reports no interval)"
    )

    assert main(["law", "chain", "--student", "1B", "--teacher", "2B"]) == 0
    assert "the teacher is within reach: no assistant needed" in capsys.readouterr().out


def test_cli_reads_a_law_file_and_the_round_trip_keeps_the_plan(tmp_path, capsys):
    law, path = fitted(), tmp_path / "law.json"
    law.save(path)
    loaded = CapacityGapLaw.load(path)
    assert loaded.to_dict() == law.to_dict()
    assert loaded.chain("1B", "70B") == law.chain("1B", "70B")
    assert main(["law", "chain", "--student", "1B", "--teacher", "70B", "--law", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "law: fitted, t* = 2.93 x s; a step may go up to the upper end of k's interval [2.39, 3.59]" in printed
    assert printed.count("assistant") == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--student", "1B", "--teacher", "1B"], "must be smaller than the teacher"),
        (["--student", "3 bananas", "--teacher", "1B"], "cannot read '3 bananas'"),
        (["--student", "0", "--teacher", "1B"], "positive number"),
    ],
)
def test_cli_refuses_bad_sizes_in_one_line_with_exit_2(capsys, argv, message):
    assert main(["law", "chain", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and message in captured.err
