"""On-disk bytes per cached token of each TeacherCache mode, against dense fp16 log-probs.

Builds small real caches with a tiny random LlamaForCausalLM teacher of vocabulary 8192 and 32000 and
reads the sizes back from disk. Baseline: the dense fp16 cache (full log-probs, 2 * V bytes per
position), built in the same run. Signal bytes count only the teacher columns; file bytes are whole
shard files (input_ids and Arrow framing included) divided by predicted positions.

    python bench/bench_cache_bytes.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_capgap.cache import TeacherCache

CONFIGS = [("topk", 16), ("topk", 64), ("topk", 128), ("sampled", 16), ("sampled", 64), ("dense", None)]
DISTILLKIT_TOP128_BYTES = 300
GOAL_FRACTION = 0.005


def tiny_teacher(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def measure(vocab_size: int, rows: int, seq_len: int, workdir: Path) -> list[dict]:
    teacher = tiny_teacher(vocab_size)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    results = []
    for mode, k in CONFIGS:
        path = workdir / f"v{vocab_size}-{mode}-{k}"
        cache = TeacherCache.build(
            teacher, dataset, path, mode=mode, k=k or 1, batch_size=rows, progress=False
        )
        file_bytes = sum(shard["bytes"] for shard in cache.manifest["shards"])
        results.append(
            {
                "vocab": vocab_size,
                "mode": mode,
                "k": k if k else "-",
                "signal": cache.bytes_per_token,
                "file": file_bytes / cache.manifest["num_positions"],
            }
        )
    baseline = next(r["signal"] for r in results if r["mode"] == "dense")
    for result in results:
        result["ratio"] = result["signal"] / baseline
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=129)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as workdir:
        results = [r for v in (8192, 32000) for r in measure(v, args.rows, args.seq_len, Path(workdir))]

    print(
        f"teacher cache bytes per predicted position ({args.rows} rows x {args.seq_len - 1} positions per vocab)"
    )
    print("baseline: dense fp16 log-probs of the same vocabulary (ratio = signal / baseline)\n")
    print("| vocab | mode | k | signal B/token | file B/token | ratio vs dense fp16 |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['vocab']} | {r['mode']} | {r['k']} | {r['signal']:.1f} | {r['file']:.1f} | {r['ratio']:.4%} |"
        )

    goal = next(r for r in results if r["vocab"] == 32000 and r["mode"] == "topk" and r["k"] == 64)
    top128 = next(r for r in results if r["vocab"] == 32000 and r["mode"] == "topk" and r["k"] == 128)
    verdict = "met" if goal["ratio"] <= GOAL_FRACTION else "NOT met"
    print(
        f"\ngoal topk k=64 at V=32000 <= {GOAL_FRACTION:.1%} of dense fp16: {goal['ratio']:.3%} ({verdict})"
    )
    print(
        f"top-128 at V=32000: {top128['signal']:.0f} B/token vs DistillKit's published ~{DISTILLKIT_TOP128_BYTES} "
        f"B/token for its compressed top-128 format ({top128['signal'] / DISTILLKIT_TOP128_BYTES:.2f}x)"
    )


if __name__ == "__main__":
    main()
