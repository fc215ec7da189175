"""Real multi-process CPU training (gloo) through `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_two_process_training_online_and_from_a_cache(tmp_path):
    """2 ranks x 2 rows == 1 process x 4 rows (gradients token-normalised across processes), also when
    one rank's micro-batch has no labelled token; and training from a teacher cache keeps every
    position aligned with its signal under data sharding."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "recipes" / "accelerate" / "cpu.yaml"), "--main_process_port", "0",
        str(REPO / "tests" / "ddp_train_script.py"), str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["empty_micro_batches"] for r in ranks} == {1}  # rank 1's, summed over ranks in the log
    # Cache built by both ranks; two shuffled epochs over 12 rows of 8 tokens split across 2 processes,
    # every labelled position carrying its own teacher signal.
    assert sum(r["positions_seen"] for r in ranks) == 2 * 12 * 7
    assert all(r["positions_aligned"] == r["positions_seen"] for r in ranks)
    assert ranks[0]["shards"] > 1
    deltas = [load_file(str(tmp_path / f"rank{r}.safetensors"))["delta"] for r in (0, 1)]
    torch.testing.assert_close(deltas[0], deltas[1])  # DDP kept the replicas identical

    sys.path.insert(0, str(REPO / "tests"))
    from ddp_train_script import train

    before, after, _ = train(tmp_path / "single", per_device_batch=4)
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], after - before, rtol=1e-4, atol=1e-6)
