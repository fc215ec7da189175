"""Benchmark structured pruning: cost against a training step, and quality against random init.

    python bench/bench_pruning.py [--sizes 1,4,12,30] [--steps 150]

Part 1 (cost): for LLaMA teachers of roughly 1M..30M parameters, prune to half size with Taylor
scores on 4 calibration batches. Baseline: one forward+backward+AdamW step of the teacher on one such
batch. Peak extra memory is reported as a multiple of the teacher's weight bytes (each size runs in
its own process so peaks do not mix).

Part 2 (quality): a teacher trained briefly on a learnable toy language (a random permutation cycle
over the vocabulary, with 10% noise tokens) is pruned to 50% and 25% of its size; validation loss of
the pruned student (Taylor, and magnitude fallback) is printed as a ratio to the baseline: a
random-init model of the same shape.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_capgap.pruning import prune_model

VOCAB = 512
SEQ = 64
BATCH = 8


def teacher_config(hidden: int, layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64,
        intermediate_size=hidden * 8 // 3 // 8 * 8,
    )


SIZES = {1: (128, 4), 4: (256, 5), 12: (384, 7), 30: (512, 10)}  # ~M params: (hidden, layers)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def cost_of_size(size: int, queue: multiprocessing.Queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_config(teacher_config(*SIZES[size]))
    batches = [{"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ))} for _ in range(4)]
    ids = batches[0]["input_ids"]
    teacher.eval()
    with torch.no_grad():
        teacher(input_ids=ids)  # warm-up, so neither timing pays first-call costs
    before = rss_bytes()
    start = time.perf_counter()
    student = prune_model(teacher, target_params=n_params(teacher) // 2, calibration=batches)
    prune_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # measured before training

    teacher.train()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    teacher(input_ids=ids, labels=ids).loss.backward()  # creates gradients and optimizer state
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    teacher(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    step_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    queue.put((n_params(teacher), n_params(student), step_s, prune_s, max(peak, 0) / weight_bytes))


def toy_batch(count: int, generator: torch.Generator) -> torch.Tensor:
    successor = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))
    rows = torch.empty(count, SEQ, dtype=torch.long)
    rows[:, 0] = torch.randint(0, VOCAB, (count,), generator=generator)
    for t in range(1, SEQ):
        rows[:, t] = successor[rows[:, t - 1]]
    noise = torch.rand(rows.shape, generator=generator) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, rows.shape, generator=generator), rows)


def loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def quality(steps: int) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(teacher_config(*SIZES[4]))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    for _ in range(steps):
        ids = toy_batch(BATCH, generator)
        teacher(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()
    validation = toy_batch(64, generator)
    calibration = [{"input_ids": toy_batch(BATCH, generator)} for _ in range(4)]
    print(
        f"\nquality: teacher {n_params(teacher) / 1e6:.1f}M trained {steps} steps, val loss "
        f"{loss(teacher, validation):.3f} (uniform would be {torch.log(torch.tensor(float(VOCAB))):.3f})"
    )
    print(
        f"{'kept':>6} {'shape (hidden/layers/heads/ffn)':>32} {'random':>8} {'taylor':>8} {'magnitude':>10} "
        f"{'taylor/random':>14} {'magnitude/random':>17}"
    )
    for fraction in (0.5, 0.25):
        target = int(n_params(teacher) * fraction)
        taylor = prune_model(teacher, target_params=target, calibration=calibration)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            magnitude = prune_model(teacher, target_params=target)
        random_init = AutoModelForCausalLM.from_config(taylor.config).eval()
        c = taylor.config
        shape = f"{c.hidden_size}/{c.num_hidden_layers}/{c.num_attention_heads}/{c.intermediate_size}"
        losses = [loss(m, validation) for m in (random_init, taylor, magnitude)]
        print(
            f"{fraction:>6.0%} {shape:>32} {losses[0]:>8.3f} {losses[1]:>8.3f} {losses[2]:>10.3f} "
            f"{losses[1] / losses[0]:>14.3f} {losses[2] / losses[0]:>17.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,12,30", help=f"teacher sizes from {sorted(SIZES)} (~M params)")
    parser.add_argument("--steps", type=int, default=150, help="teacher training steps for the quality table")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(
        f"cost: prune to 50% with Taylor scores on 4 batches of {BATCH}x{SEQ} tokens; baseline = one "
        "training step (fwd+bwd+AdamW) of the teacher on one batch; 1 thread"
    )
    print(
        f"{'teacher':>10} {'student':>10} {'step s':>8} {'prune s':>8} {'prune/step':>11} "
        f"{'peak extra / teacher bytes':>27}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        queue = context.Queue()
        worker = context.Process(target=cost_of_size, args=(size, queue))
        worker.start()
        teacher, student, step_s, prune_s, memory = queue.get()
        worker.join()
        print(
            f"{teacher:>10,} {student:>10,} {step_s:>8.3f} {prune_s:>8.3f} {prune_s / step_s:>11.1f} {memory:>27.2f}"
        )
    quality(args.steps)


if __name__ == "__main__":
    main()
