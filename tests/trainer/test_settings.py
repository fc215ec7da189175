"""The distillation settings are declared and checked once (hf_capgap.trainer.settings): the trainer's
DistillationConfig, the sweep's SweepConfig and the MiniMA recipe's MinimaConfig show the same fields
and refuse the same bad value with the same message."""

from __future__ import annotations

import dataclasses

import pytest

from hf_capgap.minima import MinimaConfig, build_config
from hf_capgap.sweep import SweepConfig
from hf_capgap.trainer import DistillationConfig
from hf_capgap.trainer.settings import DistillationSettings, TeacherCacheSettings


def _trainer(tmp_path, values):
    return DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], **values)


def _sweep(tmp_path, values):
    return SweepConfig.from_dict(
        {"family": "micro", "student_sizes": ["21K"], "output_dir": str(tmp_path / "s"), **values}
    )


def _minima(tmp_path, values):
    return build_config({"output_dir": str(tmp_path / "m"), **values})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alpha": 1.5}, "alpha must be in [0, 1], got 1.5."),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0."),
        ({"teacher_dtype": "fp8"}, "teacher_dtype='fp8' must be one of auto, bfloat16, float16, float32."),
    ],
)
def test_a_bad_distillation_setting_is_refused_alike_by_every_config(tmp_path, values, message):
    for make in (_trainer, _sweep, _minima):
        with pytest.raises(ValueError) as info:
            make(tmp_path, values)
        assert str(info.value) == message, make.__name__
    assert not any((tmp_path / name).exists() for name in ("out", "s", "m"))


def test_an_unknown_loss_is_refused_by_every_config_naming_its_choices(tmp_path):
    """The divergences and taid (with its TaidSettings schedule) in every config."""
    choices = "forward_kl, reverse_kl, jsd, skew_kl, tvd, taid"
    for make in (_trainer, _sweep, _minima):
        with pytest.raises(ValueError) as info:
            make(tmp_path, {"loss": "mse"})
        assert str(info.value) == f"loss='mse' must be one of {choices}.", make.__name__
    assert not any((tmp_path / name).exists() for name in ("out", "s", "m"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cache_mode": "sampled", "loss": "jsd"}, "cache_mode='sampled' estimates forward_kl only; got loss='jsd'."),
        ({"cache_sampler": "stratified"}, "cache_sampler='stratified' must be one of systematic, multinomial."),
        ({"cache_k": 0}, "cache_k=0 must be >= 1."),
    ],
)
def test_a_bad_teacher_cache_setting_is_refused_alike_by_sweep_and_minima(tmp_path, values, message):
    for make in (_sweep, _minima):
        with pytest.raises(ValueError) as info:
            make(tmp_path, values)
        assert str(info.value) == message, make.__name__


def test_every_config_shows_the_shared_fields_with_one_default_and_help():
    shared = {item.name: item for item in dataclasses.fields(DistillationSettings)}
    cached = {item.name: item for item in dataclasses.fields(TeacherCacheSettings)}
    for config, fields in ((DistillationConfig, shared), (SweepConfig, cached), (MinimaConfig, cached)):
        own = {item.name: item for item in dataclasses.fields(config)}
        for name, item in fields.items():
            assert own[name].default == item.default and own[name].metadata == item.metadata, (config, name)


def test_shared_settings_are_keyword_only_so_each_config_keeps_its_positional_order():
    from hf_capgap.sweep import SweepConfig

    assert SweepConfig("tiny", ["110K"], "sweep-out").family == "tiny"
    config = MinimaConfig("run", "outputs")
    assert (config.run_name, config.output_dir) == ("run", "outputs")
    assert DistillationConfig("out", report_to=[]).output_dir == "out"
