"""On-disk bytes per cached token of each TeacherCache setting: format 4 (measured) vs formats 3 and 1.

Uses the trained teacher of ``bench_cache_training.py`` (same settings: trained once and saved, or
loaded when that script already ran) at a realistic vocabulary (default 32,000) over --rows held-out
rows of the embedded corpus, writes real caches and reads the sizes back from disk. Baselines: the
format-1 layout of the same setting (k fixed slots per position: sampled 5k bytes = uint16 id + uint8
count + fp16 log-prob per slot; top-k 4k + 4) and, for sampled caches, format 3 (each distinct id in
the vocabulary's id type, 2 bytes below 65,536 tokens and 4 above, instead of format 4's varint-coded
gaps; the rest the same), both computed from the same draws since their writers are gone.

For sampled caches (systematic draws, the default, and independent multinomial draws, which format 1
stored) it also reports how many distinct ids a position holds (what the bytes pay for), the bytes
each coded id takes, the share of them drawn exactly once (whose count formats 3 and 4 leave
implicit), and what storing
each drawn id's fp16 log-prob would add (2 bytes per distinct id) against the 2 bytes per position
of the teacher entropy stored instead: the gradient needs neither, the logged KL
value needs one of them.

Then the draws ``bytes_per_token=50`` picks for this teacher, and the bytes they take. Last, for
systematic draws: how much of the sampled signal's variance comes from the tokens k draws
always reach (k p >= 1), the part an exact-top-few + sampled-tail hybrid could remove. A token of
k p = n + f draws n or n + 1 times, so its count / k has variance f (1 - f) / k^2.

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

    print(
        f"teacher cache bytes per labelled position: {args.rows} held-out rows x {args.seq_len - 1} positions, "
        f"vocabulary {len(tokenizer)}, the bench teacher of bench_cache_training.py"
    )
    print("baseline: format 1 of the same setting (k fixed slots per position)\n")
    print(
        "| mode | k / draws | sampler | format 4 signal B/token | file B/token | format 3 B/token | format 1 B/token |"
        " format 4 / format 1 | distinct ids per position: mean / median / p90 | B per coded id |"
        " + per-id fp16 log-probs would add | ids drawn once |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as workdir:
        for mode, k, sampler in SETTINGS:
            cache = TeacherCache.build(
                teacher,
                eval_rows,
                Path(workdir) / f"{mode}-{k}-{sampler}",
                tokenizer=tokenizer,
                mode=mode,
                k=k,
                sampler=sampler or "systematic",
                batch_size=16,
                progress=False,
            )
            file_bytes = sum(shard["bytes"] for shard in cache.manifest["shards"]) / cache.manifest["num_positions"]
            old = format1_bytes(mode, k)
            distinct, per_id, extra, once, format3 = "-", "-", "-", "-", f"{cache.bytes_per_token:.1f}"
            if mode == "sampled":
                sizes, repeated, gaps = (np.concatenate([np.asarray(row) for row in cache.dataset[name]])
                                         for name in ("sample_sizes", "repeat_sizes", "sample_id_gaps"))  # fmt: skip
                distinct = f"{sizes.mean():.1f} / {np.median(sizes):.0f} / {np.percentile(sizes, 90):.0f}"
                per_id = f"{len(gaps) / sizes.sum():.2f}"
                extra = f"{2 * sizes.mean():.1f} B"
                once = f"{1 - repeated.sum() / sizes.sum():.0%}"
                id_bytes = np.dtype(cache.manifest["id_dtype"]).itemsize
                format3 = f"{cache.bytes_per_token + (id_bytes * sizes.sum() - len(gaps)) / len(sizes):.1f}"
            print(
                f"| {mode} | {k} | {sampler or '-'} | {cache.bytes_per_token:.1f} | {file_bytes:.1f} | {format3} |"
                f" {old} | {cache.bytes_per_token / old:.2f} | {distinct} | {per_id} | {extra} | {once} |"
            )
        budget = TeacherCache.build(teacher, eval_rows, Path(workdir) / "budget", tokenizer=tokenizer, mode="sampled",
                                    bytes_per_token=BYTES_GOAL, batch_size=16, progress=False)  # fmt: skip
        print(
            f"\nbytes_per_token={BYTES_GOAL} picks {budget.manifest['draws']} systematic draws: "
            f"{budget.bytes_per_token:.1f} B/token over these rows"
        )
    print_certain_token_variance(teacher, eval_rows)
    print(
        f"\ndense fp16 would store {2 * len(tokenizer)} B/token; DistillKit publishes ~{DISTILLKIT_TOP128_BYTES} "
        f"B/token for its compressed top-128 format; goal of issue 13: a setting <= {BYTES_GOAL} B/token"
    )


@torch.inference_mode()
def print_certain_token_variance(teacher, rows, chunk: int = 8) -> None:
    """Per position, the tokens systematic draws always reach and their share of the count variance."""
    print(
        "\n| systematic draws | tokens always drawn per position (k p >= 1) | their mass |"
        " their share of the count variance |"
    )
    print("|---:|---:|---:|---:|")
    ids = torch.tensor(rows["input_ids"], dtype=torch.long)
    for draws in (16, 32, 64):
        certain = mass = head = total = 0.0
        for low in range(0, len(ids), chunk):
            probs = torch.softmax(teacher(ids[low : low + chunk]).logits[:, :-1].float(), dim=-1)
            scaled = probs * draws
            fraction = scaled - scaled.floor()
            variance = fraction * (1 - fraction) / draws**2
            always = scaled >= 1
            certain += always.sum().item()
            mass += (probs * always).sum().item()
            head += (variance * always).sum().item()
            total += variance.sum().item()
        positions = len(ids) * (ids.shape[1] - 1)
        print(f"| {draws} | {certain / positions:.2f} | {mass / positions:.3f} | {head / total:.1%} |")


if __name__ == "__main__":
    main()
