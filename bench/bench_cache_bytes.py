"""On-disk bytes per cached token of each TeacherCache setting: format 2 (measured) vs format 1 (fixed slots).

Uses the trained teacher of ``bench_cache_training.py`` (same settings: trained once and saved, or
loaded when that script already ran) at a realistic vocabulary (default 32,000) over --rows held-out
rows of the embedded corpus, writes real caches and reads the sizes back from disk. Baseline: the
format-1 layout of the same setting (k fixed slots per position: sampled 5k bytes = uint16 id + uint8
count + fp16 log-prob per slot; top-k 4k + 4), computed since the format-1 writer is gone.

For sampled caches (systematic draws, the default, and independent multinomial draws, which format 1
stored) it also reports how many distinct ids a position holds (what format 2 pays for)
and what storing each drawn id's fp16 log-prob would add (2 bytes per distinct id) against the 2
bytes per position of the teacher entropy that format 2 stores instead: the gradient needs neither,
the logged KL value needs one of them.

    python bench/bench_cache_bytes.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_cache_training import bench_data, bench_parser, format1_bytes, teacher_settings, trained_teacher

from hf_capgap import TeacherCache

SETTINGS = (
    [("topk", k, None) for k in (16, 64, 128)]
    + [("sampled", k, "systematic") for k in (4, 8, 16, 24, 32, 48, 64, 128)]
    + [("sampled", k, "multinomial") for k in (16, 64)]
)
BYTES_GOAL = 50
DISTILLKIT_TOP128_BYTES = 300


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=64, help="held-out rows cached per setting")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer, train_rows, eval_rows = bench_data(args.vocab, args.seq_len, args.teacher_steps * 8, args.rows)
    teacher = trained_teacher(tokenizer, train_rows, teacher_settings(args), args.work)

    print(f"teacher cache bytes per labelled position: {args.rows} held-out rows x {args.seq_len - 1} positions, "
          f"vocabulary {len(tokenizer)}, the bench teacher of bench_cache_training.py")
    print("baseline: format 1 of the same setting (k fixed slots per position)\n")
    print("| mode | k / draws | sampler | format 2 signal B/token | file B/token | format 1 B/token | format 2 / format 1 |"
          " distinct ids per position: mean / median / p90 | + per-id fp16 log-probs would add |")
    print("|---|---:|---|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as workdir:
        for mode, k, sampler in SETTINGS:
            cache = TeacherCache.build(teacher, eval_rows, Path(workdir) / f"{mode}-{k}-{sampler}", tokenizer=tokenizer,
                                       mode=mode, k=k, sampler=sampler or "systematic", batch_size=16,
                                       progress=False)  # fmt: skip
            file_bytes = sum(shard["bytes"] for shard in cache.manifest["shards"]) / cache.manifest["num_positions"]
            old = format1_bytes(mode, k)
            distinct, extra = "-", "-"
            if mode == "sampled":
                sizes = np.concatenate([np.asarray(row) for row in cache.dataset["sample_sizes"]])
                distinct = f"{sizes.mean():.1f} / {np.median(sizes):.0f} / {np.percentile(sizes, 90):.0f}"
                extra = f"{2 * sizes.mean():.1f} B"
            print(f"| {mode} | {k} | {sampler or '-'} | {cache.bytes_per_token:.1f} | {file_bytes:.1f} | {old} |"
                  f" {cache.bytes_per_token / old:.2f} | {distinct} | {extra} |")  # fmt: skip
    print(f"\ndense fp16 would store {2 * len(tokenizer)} B/token; DistillKit publishes ~{DISTILLKIT_TOP128_BYTES} "
          f"B/token for its compressed top-128 format; goal of issue 13: a setting <= {BYTES_GOAL} B/token")


if __name__ == "__main__":
    main()
