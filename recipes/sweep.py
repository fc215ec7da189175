"""Run the capacity-gap sweep of a YAML preset (resumable), then fit the law.

    python recipes/sweep.py recipes/configs/sweep_tiny.yaml [--key value ...]
    python recipes/sweep.py recipes/configs/sweep_tiny.yaml --status
    python recipes/sweep.py --help               # every key, with its help

Keys are the fields of ``hf_capgap.sweep.SweepConfig``; ``--key value`` pairs override the YAML
(lists as ``--student_sizes 280K 600K``). ``--status`` prints which runs are done, running and left.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from hf_capgap.errors import HfCapgapError
from hf_capgap.sweep import SweepConfig, format_status, run_sweep, sweep_report, sweep_status
from hf_capgap.utils.recipe_args import parse_with_preset, read_preset, split_preset


@dataclass(frozen=True)
class SweepCommand:
    status: bool = field(default=False, metadata={"help": "Print the progress table and exit."})


def parse_config(argv: list[str]) -> tuple[SweepConfig, bool]:
    preset, overrides = split_preset(argv)
    values = {} if preset is None else read_preset(preset, [SweepConfig])
    config, command = parse_with_preset([SweepConfig, SweepCommand], values, overrides, description=__doc__)
    return config, command.status


def run_and_report(config: SweepConfig) -> list[dict[str, Any]]:
    """Run the sweep, then print its progress table, diverged runs and law; return the ledger records."""
    records = run_sweep(config)
    print(sweep_report(config))
    return records


def main(argv: list[str] | None = None) -> None:
    try:
        config, status_only = parse_config(sys.argv[1:] if argv is None else argv)
        if status_only:
            print(format_status(sweep_status(config)))
            return
        run_and_report(config)
    except (HfCapgapError, ValueError, FileNotFoundError) as err:  # settings errors, raised before any work starts
        sys.exit(f"sweep: {err}")


if __name__ == "__main__":
    main()
