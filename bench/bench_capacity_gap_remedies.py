"""Capacity-gap remedies on the tiny ladder (issue 21): do teacher assistants or TAID from the 963K teacher close
the gap between direct distillation from it and from the best ladder teacher for the student?

Every cell is one cell of the capacity-gap sweep (``hf_capgap.sweep.run_cell``) with the settings of
``recipes/configs/sweep_tiny.yaml``, one teacher and one seed: the student is pruned from its teacher (Taylor
scores), distilled on the same 614,400 tokens (300 steps of 16 x 128, 0.5 CE + 0.5 divergence, T = 1) and scored
on the ladder's 512 held-out rows. Per student size, the arms:

    direct-963K            forward KL from the 963K teacher (the sweep's run)
    taid-963K              loss="taid" from the 963K teacher, the paper's default schedule (the taid_* defaults)
    direct-best            forward KL from the best ladder teacher for that student (bench/results/sweep.md:
                           418K for 110K and 170K, 664K for 240K)
    chain-963K             the sweep's chained cell (assistants: auto): the paper prior's chain (k = 2.5,
                           CapacityGapLaw.chain) from 963K to the student; each assistant pruned from the model
                           above it and distilled from it on the same 614,400 tokens (seed 0), built once per
                           student size and shared by the seeds; the student pruned from the last assistant
    taid-963K-t0.1-a5e-3   TAID with taid_t_start 0.1 and taid_alpha 5e-3 (a target starting nearer the student,
                           a 10x faster adaptive step)
    chain-963K-a4x         chain-963K with each assistant distilled on 4 x the student's tokens (assistant_tokens =
                           4 x tokens_per_run); the student's own budget is unchanged

All arms read their teacher online (cache_mode: online), not from the sweep's sampled-64 cache: TAID needs the
teacher's whole distribution, which a sampled cache does not keep, and one teacher signal for every arm keeps the
pairs like for like (the sampled cache is unbiased for forward KL, so the direct arms match the sweep's up to
sampling noise). The seed is the sweep's ``seed``: with an online teacher it sets the Trainer's seed (the order
of the training rows) and the torch seed at pruning; Taylor pruning itself is deterministic, so the seeds give
one pruned student per teacher trained on different orders. The arms of one student and one seed share
that seed; differences are paired per seed.

Prints the held-out loss mean +- standard error per cell (over seeds) with the wall seconds per run, each remedy's
paired difference against direct-963K beside best - direct-963K and the share of the gap it recovers,
(direct-963K - remedy) / (direct-963K - best) from the mean paired differences (above 100%: the remedy beats the
best teacher), and the chain's assistants with their own held-out loss, tokens and wall seconds. Wall seconds are
per run (pruning, distillation, evaluation; a chain student's exclude its assistants), on whatever else shares
the machine.

Resumable: each finished run is a line of --output-dir/runs.jsonl; a rerun skips it. The ladder is
pretrained first if --ladder-dir lacks it (about 6 minutes on 2 idle cores).

    python bench/bench_capacity_gap_remedies.py [--students 110K,170K,240K --seeds 0,1,2 --arms ...]
    python bench/bench_capacity_gap_remedies.py --smoke   # micro ladder, 1 student, 1 seed, 2 steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "recipes" / "configs" / "sweep_tiny.yaml"
BIG_TEACHER = "llama-963K"
BEST_TEACHER = {"110K": "llama-418K", "170K": "llama-418K", "240K": "llama-664K"}
"""The sweep's best teacher per student (bench/results/sweep.md)."""
ARM_SETTINGS: dict[str, dict[str, Any]] = {
    "direct-963K": {},
    "taid-963K": {"loss": "taid"},
    "direct-best": {},
    "chain-963K": {"assistants": "auto"},
    "taid-963K-t0.1-a5e-3": {"loss": "taid", "taid_t_start": 0.1, "taid_alpha": 5e-3},
    "chain-963K-a4x": {"assistants": "auto"},
}
"""Each arm's overrides of the sweep's settings; every arm but direct-best learns from the big teacher."""
ASSISTANT_TOKEN_MULTIPLE = {"chain-963K-a4x": 4}
"""Chain arms whose assistants train on this multiple of the student's tokens_per_run (others: 1x)."""
ARMS = tuple(ARM_SETTINGS)
BASELINES = ("direct-963K", "direct-best")
REMEDIES = tuple(arm for arm in ARMS if arm not in BASELINES)

SMOKE_BIG_TEACHER = "llama-271K"
SMOKE_BEST_TEACHER = {"21K": "llama-86K"}
SMOKE_SETTINGS = {
    "family": "micro",
    "tokens_per_run": 2 * 16 * 64,
    "seq_len": 64,
    "eval_rows": 16,
    "calibration_rows": 16,
}
"""--smoke: the micro ladder (pretrains in seconds) and two steps per run; checks the script, measures nothing."""


def sweep_config(base: dict[str, Any], arm: str, root: Path) -> Any:
    """The sweep's config of an arm, with an online teacher (grid fields are set by run_cell)."""
    from hf_capgap.sweep import SweepConfig

    settings = {**base, **ARM_SETTINGS[arm], "cache_mode": "online", "output_dir": str(root)}
    if arm in ASSISTANT_TOKEN_MULTIPLE:
        settings["assistant_tokens"] = ASSISTANT_TOKEN_MULTIPLE[arm] * int(base["tokens_per_run"])
    return SweepConfig.from_dict(settings)


def run_cells(
    base: dict[str, Any],
    big: str,
    best: dict[str, str],
    students: list[str],
    seeds: list[int],
    arms: tuple[str, ...],
    root: Path,
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(student, arm, seed) -> the sweep's record of that cell, made by ``hf_capgap.sweep.run_cell``.

    Finished runs are appended to ``runs.jsonl`` and skipped by a rerun; the chain arm's assistants are kept in
    ``root/assistants`` and built once per chain (per student size), shared by the seeds.
    """
    from hf_capgap.sweep import run_cell

    root.mkdir(parents=True, exist_ok=True)
    ledger = root / "runs.jsonl"
    done = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.is_file() else []
    records = {(record["student_name"], record["arm"], record["seed"]): record for record in done}
    for student in students:  # one student finished over all seeds before the next: a cut run still pairs
        for seed in seeds:
            for arm in arms:
                if (student, arm, seed) in records:
                    continue
                teacher = best[student] if arm == "direct-best" else big
                record = {**run_cell(sweep_config(base, arm, root), student, teacher, seed), "arm": arm, "seed": seed}
                record["student_name"] = student
                with ledger.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                records[(student, arm, seed)] = record
                print(
                    f"seed {seed} {arm:<22} {record['run_id']:<36} eval_loss {record['eval_loss']:.4f}"
                    f" (pruned {record['pruned_eval_loss']:.4f}, {record['wall_seconds']:.0f} s)",
                    flush=True,
                )
    return records


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (nan for one value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def report(
    records: dict[tuple[str, str, int], dict[str, Any]], students: list[str], seeds: list[int], arms: tuple[str, ...]
) -> str:
    """Markdown tables: loss per cell, each remedy's paired difference against direct-963K and the share of the gap
    it recovers, and the chain arm's assistants.

    Per student, only the seeds whose run arms all finished count (a cut run reports what it paired); a remedy with
    no run at all for a student (e.g. skipped for time) shows "not run" there instead of dropping the student."""
    loss = {key: record["eval_loss"] for key, record in records.items()}
    ran = {
        student: [arm for arm in arms if any((student, arm, seed) in loss for seed in seeds)] for student in students
    }
    paired = {
        student: [seed for seed in seeds if all((student, arm, seed) in loss for arm in ran[student])]
        for student in students
    }
    students = [student for student in students if set(BASELINES) <= set(ran[student])]
    students = [student for student in students if paired[student]]
    lines = [
        "held-out loss, nats/token, mean +- standard error over seeds ("
        + "; ".join(f"{student}: seeds {paired[student]}" for student in students)
        + "); wall s per run in brackets",
        "",
        "| student | " + " | ".join(arms) + " |",
        "|---|" + "---:|" * len(arms),
    ]
    for student in students:
        seeds = paired[student]
        cells = []
        for arm in arms:
            if arm not in ran[student]:
                cells.append("not run")
                continue
            mean, se = mean_se([loss[(student, arm, seed)] for seed in seeds])
            wall = statistics.fmean(records[(student, arm, seed)]["wall_seconds"] for seed in seeds)
            cells.append(f"{mean:.4f} +- {se:.4f} ({wall:.0f})")
        lines.append(f"| {student} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "paired differences against direct-963K (negative: better) and the share of the gap direct-963K - direct-best"
        " each remedy recovers, (direct - remedy) / (direct - best) from the mean paired differences",
        "",
        "| student | remedy | remedy - direct-963K | best - direct-963K | recovers | per seed |",
        "|---|---|---:|---:|---:|---|",
    ]
    for student in students:
        seeds = paired[student]
        best = [loss[(student, "direct-best", seed)] - loss[(student, "direct-963K", seed)] for seed in seeds]
        best_mean, best_se = mean_se(best)
        for arm in (arm for arm in ran[student] if arm in REMEDIES):
            diff = [loss[(student, arm, seed)] - loss[(student, "direct-963K", seed)] for seed in seeds]
            mean, se = mean_se(diff)
            per_seed = ", ".join(f"{d / b:.0%}" if b else "nan" for d, b in zip(diff, best, strict=True))
            lines.append(
                f"| {student} | {arm} | {mean:+.4f} +- {se:.4f} | {best_mean:+.4f} +- {best_se:.4f} |"
                f" {mean / best_mean if best_mean else math.nan:.0%} | {per_seed} |"
            )
    chains = [arm for arm in arms if ARM_SETTINGS[arm].get("assistants")]
    if chains:
        lines += [
            "",
            "the chain arms' assistants (each built once, seed 0, shared by the student seeds)",
            "",
            "| student | arm | assistant (params) | distilled from | held-out loss | tokens | wall s |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for student in students:
            for arm in (arm for arm in chains if arm in ran[student]):
                for assistant in records[(student, arm, paired[student][0])]["assistants"]:
                    source = Path(assistant["distilled_from"]).name
                    lines.append(
                        f"| {student} | {arm} | {assistant['student_params']:,} | {source} |"
                        f" {assistant['eval_loss']:.4f} | {assistant['tokens']:,} | {assistant['wall_seconds']:.0f} |"
                    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default="110K,170K,240K", help="Student sizes, comma-separated.")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds, comma-separated (the pairs).")
    parser.add_argument("--output-dir", default="outputs/bench/capacity_gap_remedies", help="runs.jsonl and scratch.")
    parser.add_argument("--ladder-dir", default=None, help="Ladder folder (default: sweep_tiny.yaml's).")
    parser.add_argument(
        "--alpha", type=float, default=None, help="Weight of the divergence in every arm (default: sweep_tiny's 0.5)."
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"Arms, comma-separated, from {', '.join(ARMS)}.")
    parser.add_argument("--smoke", action="store_true", help="Micro ladder, 1 student, 1 seed, 2 steps per run.")
    args = parser.parse_args(argv)

    base = yaml.safe_load(TINY_CONFIG.read_text())
    for per_run in ("student_sizes", "output_dir", "teachers"):
        base.pop(per_run, None)
    root = Path(args.output_dir)
    if args.smoke:
        base.update(SMOKE_SETTINGS, ladder_dir=str(root / "ladder"))
        big, best, students, seeds = SMOKE_BIG_TEACHER, SMOKE_BEST_TEACHER, ["21K"], [0]
    else:
        big, best = BIG_TEACHER, BEST_TEACHER
        students = [size.strip() for size in args.students.split(",") if size.strip()]
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        unknown = sorted(set(students) - set(best))
        if unknown:
            parser.error(f"students {unknown} have no best teacher on record; choose from {sorted(best)}.")
    base["student_sizes"] = students  # run_cell refuses a cell outside its config's grid
    arms = tuple(arm.strip() for arm in args.arms.split(",") if arm.strip())
    if set(arms) - set(ARMS) or not set(BASELINES) <= set(arms):
        parser.error(f"--arms must name arms of {ARMS} and include {BASELINES}, got {arms}.")
    if args.alpha is not None:
        base["alpha"] = args.alpha
    if args.ladder_dir:
        base["ladder_dir"] = args.ladder_dir
    started = time.perf_counter()
    records = run_cells(base, big, best, students, seeds, arms, root)
    print()
    print(report(records, students, seeds, arms))
    print(f"\n{len(records)} runs, {time.perf_counter() - started:.0f} s in this invocation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
