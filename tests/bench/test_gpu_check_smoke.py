"""bench/gpu_check.py --smoke runs end to end on CPU, so the GPU script cannot rot between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def test_gpu_check_smoke_prints_every_section():
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    assert "failed" not in table, table
    for variant in ("naive", "trl-gkd", "trl-chunked", "ours"):
        assert f"| {variant} |" in table
    assert "| ours bf16 vs fp32 |" in table
    assert "| gkd |" in table and "fused lm_head" in table
    assert "| fsdp2, 1 process |" in table and "| zero3, 1 process |" in table
    assert "| build sampled k=16 |" in table and "| build topk k=64 |" in table
    assert "| build sampled k=16, batch_size=12 (ran at 12) |" in table
