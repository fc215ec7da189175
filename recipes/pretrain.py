"""Pretrain every missing teacher of a ladder preset (resumable; finished teachers are reused).

    python recipes/pretrain.py recipes/configs/pretrain_tiny.yaml [--key value ...]

Keys: ``preset``, ``output_dir``, optional ``cache_dir`` / ``num_proc``, and any field of
``hf_capgap.pretraining.PretrainSettings``; command-line ``--key value`` pairs override the YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from hf_capgap.pretraining import PretrainSettings, ensure_ladder, load_teacher

RUN_KEYS = {"preset": str, "output_dir": str, "cache_dir": str, "num_proc": int}
SETTING_KEYS = {field.name: type(field.default) for field in dataclasses.fields(PretrainSettings)}


def parse_config(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="YAML file, e.g. recipes/configs/pretrain_tiny.yaml")
    args, overrides = parser.parse_known_args(argv)
    config = yaml.safe_load(args.config.read_text()) or {}
    if len(overrides) % 2 or not all(key.startswith("--") for key in overrides[::2]):
        parser.error(f"overrides must be --key value pairs, got {overrides}")
    config.update({key[2:]: value for key, value in zip(overrides[::2], overrides[1::2])})
    known = {**RUN_KEYS, **SETTING_KEYS}
    unknown = sorted(set(config) - set(known))
    if unknown:
        parser.error(f"unknown keys {unknown}; valid keys: {sorted(known)}")
    for key in ("preset", "output_dir"):
        if key not in config:
            parser.error(f"{args.config} must set {key!r}")
    return {key: None if value is None else known[key](value) for key, value in config.items()}


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    settings = PretrainSettings(**{key: value for key, value in config.items() if key in SETTING_KEYS})
    paths = ensure_ladder(
        config["preset"],
        config["output_dir"],
        settings=settings,
        cache_dir=config.get("cache_dir"),
        num_proc=config.get("num_proc"),
    )
    print(f"{'teacher':<14}{'params':>11}{'tokens':>11}{'wall s':>9}{'val loss':>10}")
    for path in paths:
        manifest = load_teacher(path)[2]
        print(
            f"{manifest['name']:<14}{manifest['params']:>11,}{manifest['tokens_seen']:>11,}"
            f"{manifest['wall_seconds']:>9}{manifest['final_validation_loss']:>10.4f}"
        )


if __name__ == "__main__":
    main()
