"""On-policy distillation under 2 gloo CPU processes (accelerate launch)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from hf_capgap.trainer.on_policy import draw_on_policy
from tests.helpers.launch import two_process_command, two_process_env

REPO = Path(__file__).resolve().parents[2]


def test_two_ranks_generate_their_own_completions_and_draw_alike(tmp_path):
    """lmbda=1: each rank samples its micro-batch from the student and the loss is finite; lmbda=0.5: both ranks
    draw the same on/off choice for every micro-batch (the seeded draw, not the global RNG), and log the same share."""
    command = two_process_command(REPO / "tests" / "helpers" / "on_policy_ddp_script.py", str(tmp_path))
    result = subprocess.run(command, env=two_process_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"on_policy{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["full"]["rank"] for r in ranks] == [0, 1] and {r["full"]["world_size"] for r in ranks} == {2}

    for full in (r["full"] for r in ranks):
        assert full["generate_calls"] == 1
        (log,) = full["logs"]
        assert log["on_policy_share"] == 1.0 and math.isfinite(log["loss"])

    mixed = [r["mixed"] for r in ranks]
    assert mixed[0]["draws"] == mixed[1]["draws"]
    expected = [[step, micro, draw_on_policy(42, step, micro, 0.5)] for step in range(3) for micro in range(2)]
    assert mixed[0]["draws"] == expected  # 42: TrainingArguments' default seed
    assert mixed[0]["generate_calls"] == mixed[1]["generate_calls"] == sum(drawn for *_, drawn in expected)
    assert [e["on_policy_share"] for e in mixed[0]["logs"]] == [e["on_policy_share"] for e in mixed[1]["logs"]]
