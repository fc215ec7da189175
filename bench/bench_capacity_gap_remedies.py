"""Capacity-gap remedies on the tiny ladder (issue 21, TAID half): does TAID from the 963K teacher close the gap
between direct distillation from it and from the best ladder teacher for the student?

Every cell is one run of the capacity-gap sweep (``hf_capgap.sweep.run._run_one``) with the settings of
``recipes/configs/sweep_tiny.yaml``, one teacher and one seed: the student is pruned from its teacher (Taylor
scores), distilled on the same 614,400 tokens (300 steps of 16 x 128, 0.5 CE + 0.5 divergence, T = 1) and scored
on the ladder's 512 held-out rows. Per student size, three arms:

    direct-963K   forward KL from the 963K teacher (the sweep's run)
    taid-963K     loss="taid" from the 963K teacher, the paper's default schedule (the taid_* defaults)
    direct-best   forward KL from the best ladder teacher for that student (bench/results/sweep.md:
                  418K for 110K and 170K, 664K for 240K)

All arms read their teacher online (cache_mode: online), not from the sweep's sampled-64 cache: TAID needs the
teacher's whole distribution, which a sampled cache does not keep, and one teacher signal for every arm keeps the
pairs like for like (the sampled cache is unbiased for forward KL, so the direct arms match the sweep's up to
sampling noise). The seed is the sweep's ``seed``: with an online teacher it sets the Trainer's seed (the order
of the training rows) and the torch seed at pruning; Taylor pruning itself is deterministic, so the seeds give
one pruned student per teacher trained on different orders. The three arms of one student and one seed share
that seed; differences are paired per seed.

Prints the held-out loss mean +- standard error per cell (over seeds), the paired differences taid - direct-963K
and best - direct-963K, and the share of the gap that TAID recovers, (direct-963K - taid) / (direct-963K - best)
from the mean paired differences (above 100%: TAID beats the best teacher). Wall seconds are per run (pruning,
distillation, evaluation), on whatever else shares the machine.

Resumable: each finished run is a line of --output-dir/runs.jsonl; a rerun skips it. The ladder is
pretrained first if --ladder-dir lacks it (about 6 minutes on 2 idle cores).

    python bench/bench_capacity_gap_remedies.py [--students 110K,170K,240K --seeds 0,1,2]
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
ARMS = ("direct-963K", "taid-963K", "direct-best")

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


def sweep_config(base: dict[str, Any], teachers: list[str], students: list[str], seed: int, root: Path) -> Any:
    """The sweep's config for these teachers, students and seed, with an online teacher."""
    from hf_capgap.sweep import SweepConfig

    values = {**base, "teachers": teachers, "student_sizes": students, "cache_mode": "online", "seed": seed}
    return SweepConfig.from_dict({**values, "output_dir": str(root)})


def run_cells(
    base: dict[str, Any], big: str, best: dict[str, str], students: list[str], seeds: list[int], root: Path
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(student, arm, seed) -> the sweep's run record, each run made by the sweep's own ``_run_one``.

    The sweep has no public hook for one run, and SweepConfig refuses loss="taid" (the issue's "sweep runs
    loss: taid" is not built yet), so the TAID arm sets ``loss`` on a config validated as forward KL; the
    sweep's run passes it to DistillationConfig, which serves TAID from an online teacher. Finished runs are
    appended to ``runs.jsonl`` and skipped by a rerun.
    """
    from hf_capgap.law import parse_params
    from hf_capgap.sweep.config import RunSpec
    from hf_capgap.sweep.run import _run_one
    from hf_capgap.sweep.teachers import TeacherSource

    root.mkdir(parents=True, exist_ok=True)
    ledger = root / "runs.jsonl"
    done = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.is_file() else []
    records = {(record["student_name"], record["arm"], record["seed"]): record for record in done}
    cells = [
        (teacher, arm, student, seed)
        for student in students  # one student finished over all seeds before the next: a cut run still pairs
        for seed in seeds
        for arm, teacher in (("direct-963K", big), ("taid-963K", big), ("direct-best", best[student]))
        if (student, arm, seed) not in records
    ]
    if not cells:
        return records
    teachers = list(dict.fromkeys([big, *(best[student] for student in students)]))
    source = TeacherSource(sweep_config(base, teachers, students, seeds[0], root), big)
    data = source.data()
    loaded = {name: source.load(name) for name in teachers}  # tiny models: all three fit at once
    for teacher_name, arm, student, seed in cells:
        teacher, teacher_params = loaded[teacher_name]
        config = sweep_config(base, [teacher_name], [student], seed, root)
        config.loss = "taid" if arm.startswith("taid") else "forward_kl"
        spec = RunSpec(f"{student}-from-{teacher_name}", int(parse_params(student)), teacher_name, teacher_params)
        record = {**_run_one(spec, teacher, None, data, source.tokenizer, config), "arm": arm, "seed": seed}
        record["student_name"] = student
        with ledger.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        records[(student, arm, seed)] = record
        print(
            f"seed {seed} {arm:<12} {spec.run_id:<22} eval_loss {record['eval_loss']:.4f}"
            f" (pruned {record['pruned_eval_loss']:.4f}, {record['wall_seconds']:.0f} s)",
            flush=True,
        )
    return records


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (nan for one value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def report(records: dict[tuple[str, str, int], dict[str, Any]], students: list[str], seeds: list[int]) -> str:
    """Markdown tables: loss per cell, paired differences against direct-963K, and the share TAID recovers.

    Per student, only the seeds whose three arms all finished count (a cut run reports what it paired)."""
    loss = {key: record["eval_loss"] for key, record in records.items()}
    paired = {
        student: [seed for seed in seeds if all((student, arm, seed) in loss for arm in ARMS)] for student in students
    }
    students = [student for student in students if paired[student]]
    lines = [
        "held-out loss, nats/token, mean +- standard error over seeds ("
        + "; ".join(f"{student}: seeds {paired[student]}" for student in students)
        + ")",
        "",
        "| student | " + " | ".join(ARMS) + " |",
        "|---|" + "---:|" * len(ARMS),
    ]
    for student in students:
        seeds = paired[student]
        cells = [mean_se([loss[(student, arm, seed)] for seed in seeds]) for arm in ARMS]
        lines.append(f"| {student} | " + " | ".join(f"{mean:.4f} +- {se:.4f}" for mean, se in cells) + " |")
    lines += [
        "",
        "paired differences against direct-963K (negative: better), and the share of the gap"
        " direct-963K - direct-best that TAID recovers",
        "",
        "| student | taid - direct-963K | best - direct-963K | TAID recovers | per seed"
        " | wall s (direct / taid / best) |",
        "|---|---:|---:|---:|---|---|",
    ]
    for student in students:
        seeds = paired[student]
        taid = [loss[(student, "taid-963K", seed)] - loss[(student, "direct-963K", seed)] for seed in seeds]
        best = [loss[(student, "direct-best", seed)] - loss[(student, "direct-963K", seed)] for seed in seeds]
        (taid_mean, taid_se), (best_mean, best_se) = mean_se(taid), mean_se(best)
        share = taid_mean / best_mean if best_mean else math.nan
        per_seed = ", ".join(f"{t / b:.0%}" if b else "nan" for t, b in zip(taid, best, strict=True))
        walls = " / ".join(
            f"{statistics.fmean(records[(student, arm, seed)]['wall_seconds'] for seed in seeds):.0f}" for arm in ARMS
        )
        lines.append(
            f"| {student} | {taid_mean:+.4f} +- {taid_se:.4f} | {best_mean:+.4f} +- {best_se:.4f} | {share:.0%} |"
            f" {per_seed} | {walls} |"
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
    if args.alpha is not None:
        base["alpha"] = args.alpha
    if args.ladder_dir:
        base["ladder_dir"] = args.ladder_dir
    started = time.perf_counter()
    records = run_cells(base, big, best, students, seeds, root)
    print()
    print(report(records, students, seeds))
    print(f"\n{len(records)} runs, {time.perf_counter() - started:.0f} s in this invocation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
