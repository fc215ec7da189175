"""Run the capacity-gap sweep of a YAML preset (resumable), then fit the law.

    python recipes/sweep.py recipes/configs/sweep_tiny.yaml [--key value ...]
    python recipes/sweep.py recipes/configs/sweep_tiny.yaml --status

Keys are the fields of ``hf_capgap.sweep.SweepConfig``; ``--key value`` pairs override the YAML
(lists as ``--student_sizes 280K,600K``). ``--status`` prints which runs are done, running and left.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from hf_capgap.sweep import SweepConfig, format_status, run_sweep, sweep_status


def parse_config(argv: list[str] | None = None) -> tuple[SweepConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="YAML file, e.g. recipes/configs/sweep_tiny.yaml")
    parser.add_argument("--status", action="store_true", help="print the progress table and exit")
    args, overrides = parser.parse_known_args(argv)
    values = yaml.safe_load(args.config.read_text()) or {}
    if len(overrides) % 2 or not all(key.startswith("--") for key in overrides[::2]):
        parser.error(f"overrides must be --key value pairs, got {overrides}")
    values.update({key[2:]: value for key, value in zip(overrides[::2], overrides[1::2])})
    return SweepConfig.from_dict(values), args.status


def main(argv: list[str] | None = None) -> None:
    config, status_only = parse_config(argv)
    if status_only:
        print(format_status(sweep_status(config)))
        return
    run_sweep(config)


if __name__ == "__main__":
    main()
