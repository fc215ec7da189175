"""Real multi-process CPU training (gloo) through `accelerate launch`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.launch import two_process_command, two_process_env

REPO = Path(__file__).resolve().parents[2]


def launch(out: Path, *script_args: str) -> None:
    """Run tests/helpers/ddp_train_script.py on 2 gloo CPU processes (the repository on the path, for its
    ``tests.conftest`` import)."""
    command = two_process_command(REPO / "tests" / "helpers" / "ddp_train_script.py", str(out), *script_args)
    result = subprocess.run(command, env=two_process_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_training_online_and_from_a_cache(tmp_path):
    """2 ranks x 2 rows == 1 process x 4 rows (gradients token-normalised across processes), also when
    one rank's micro-batch has no labelled token; and training from a teacher cache keeps every
    position aligned with its signal under data sharding."""
    launch(tmp_path)
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

    from tests.helpers.ddp_train_script import train

    before, after, _ = train(tmp_path / "single", per_device_batch=4)
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], after - before, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["padded", "iterable", "packed"])
def test_two_process_evaluation_does_not_count_the_rows_that_even_out_the_last_batch(tmp_path, case):
    """Eval rows not a multiple of 2 ranks x 2 (5 rows; 6 streamed rows, which rank 0 dispatches; 10 rows packed
    into padding-free batches): accelerate repeats rows to fill the last batch of each rank; the token-weighted
    metrics summed over ranks equal one process over the same rows."""
    launch(tmp_path, "eval", case)
    ranks = [json.loads((tmp_path / f"eval{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]

    from tests.helpers.ddp_train_script import EVAL_METRICS, evaluate_uneven

    single, _ = evaluate_uneven(tmp_path / "single", case)
    assert set(single) == set(EVAL_METRICS)
    # eval_loss is the Trainer's: it weights each rank's loss by eval_batch_size, also on the smaller last batch
    # rank 0 dispatches from an IterableDataset (transformers' evaluation_loop), so only the token-weighted ones match.
    for name in EVAL_METRICS if case != "iterable" else set(EVAL_METRICS) - {"eval_loss"}:
        assert ranks[0][name] == pytest.approx(single[name], rel=1e-5, abs=1e-6), name


def test_two_process_taid_moves_its_schedule_as_one_process(tmp_path):
    """loss='taid': t is advanced from the objective of the whole batch (summed over ranks), so both ranks
    log the same t at every step, equal to one process over the same rows, and train the same student."""
    launch(tmp_path, "taid")
    ranks = [json.loads((tmp_path / f"taid{r}.json").read_text()) for r in (0, 1)]
    assert {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["t"] == ranks[1]["t"] and ranks[0]["taid_t"] == ranks[1]["taid_t"]
    deltas = [load_file(str(tmp_path / f"taid{r}.safetensors"))["delta"] for r in (0, 1)]
    torch.testing.assert_close(deltas[0], deltas[1])

    from tests.helpers.ddp_train_script import TAID_SETTINGS, taid_t_logged, train

    before, after, single = train(tmp_path / "single", per_device_batch=2, **TAID_SETTINGS)
    assert len(taid_t_logged(single)) == 4 and taid_t_logged(single)[-1] > TAID_SETTINGS["taid_t_start"]
    assert ranks[0]["taid_t"] == pytest.approx(taid_t_logged(single), abs=2e-6)  # logged to 6 places
    assert ranks[0]["t"] == pytest.approx(single.taid_schedule.t, abs=1e-6)
    torch.testing.assert_close(deltas[0], after - before, rtol=1e-4, atol=1e-6)
