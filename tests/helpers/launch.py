"""How tests start a script on two gloo CPU processes: accelerate with the project's CPU config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def two_process_command(script: Path, *script_args: str) -> list[str]:
    """``accelerate launch`` of ``script`` on 2 gloo processes (``recipes/accelerate/cpu.yaml``), any free port."""
    config = REPO / "recipes" / "accelerate" / "cpu.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return [*launch, "--main_process_port", "0", str(script), *script_args]


def two_process_env() -> dict[str, str]:
    """One thread per rank, and the repository on the path for the scripts' ``tests.*`` imports."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
