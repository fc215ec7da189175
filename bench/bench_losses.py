"""Peak extra memory and forward+backward time of the distillation loss, against naive torch.

Every variant gets the same inputs: student last hidden states [N, H], the student lm_head weight
[V, H] and dense teacher logits [N, V] (N = 2048 tokens, H = 256). Every variant starts from the
hidden states, so all of them pay for the same hidden @ W.T matmul and its backward (gradients for
both the hidden states and W are computed):

    naive        logits = hidden @ W.T; 0.5 * F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)
                 + 0.5 * F.cross_entropy(logits, labels); backward           <- the baseline
    trl          logits = hidden @ W.T; 0.5 * GKDTrainer.generalized_jsd_loss(beta=0, forward KL)
                 + 0.5 * F.cross_entropy; backward
    ours-logits  logits = hidden @ W.T; distillation_loss(logits, DenseTeacher, ...); backward
    ours-fused   distillation_loss(hidden, DenseTeacher, lm_head_weight=W, ...); backward

All compute 0.5 * forward KL(teacher || student) + 0.5 * CE at T = 1 in fp32; the script checks the
losses and the W gradients agree. Each variant runs in a fresh subprocess: the inputs are allocated
first, then peak extra memory = growth of ru_maxrss (getrusage, the kernel's peak RSS) over its value
after the inputs exist. Times are the median of --repeats forward+backward passes after one warm-up.

A second table measures what accumulating a bf16 lm_head gradient in bf16 over K chunks costs in
accuracy (N=16384, H=256, V=2048, bf16 logit gradients and hidden states): the relative error against
the exact (fp64) sum, next to fp32 accumulation rounded once to bf16 (what the weight's .grad holds).
It sets hf_capgap.losses.LOW_PRECISION_MAX_CHUNKS.

    python bench/bench_losses.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

TOKENS = 2048
HIDDEN = 256
VOCABS = (32000, 50257)
CHUNK_SIZES = (128, 1024)
DEFAULT_CHUNK = 128  # what the automatic chunk rule picks on CPU at V=32000
ALPHA = 0.5
BASELINE = "naive"
GOALS = {"ours-fused": (0.10, 0.5), "ours-logits": (0.25, 1.0)}  # (peak memory, time) as fractions of naive
ACCUMULATION_CHUNKS = (1, 8, 32, 64, 512)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_inputs(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden": torch.randn(TOKENS, HIDDEN, generator=generator),
        "weight": torch.randn(vocab, HIDDEN, generator=generator) / HIDDEN**0.5,
        "teacher_logits": torch.randn(TOKENS, vocab, generator=generator).mul_(3.0),
        "labels": torch.randint(0, vocab, (TOKENS,), generator=generator),
    }


def naive_loss(hidden, weight, teacher_logits, labels, chunk_size):
    logits = hidden @ weight.t()
    kl = F.kl_div(
        F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), reduction="batchmean", log_target=True
    )
    return ALPHA * kl + (1 - ALPHA) * F.cross_entropy(logits, labels)


def trl_loss(hidden, weight, teacher_logits, labels, chunk_size):
    from trl.experimental.gkd import GKDTrainer

    logits = hidden @ weight.t()
    # beta=0 is F.kl_div(student_log_probs, teacher_log_probs, log_target=True) = KL(teacher || student).
    kl = GKDTrainer.generalized_jsd_loss(logits, teacher_logits, labels=labels, beta=0.0)
    return ALPHA * kl + (1 - ALPHA) * F.cross_entropy(logits, labels)


def ours_logits_loss(hidden, weight, teacher_logits, labels, chunk_size):
    from hf_capgap.losses import DenseTeacher, LossSpec, distillation_loss

    logits = hidden @ weight.t()
    spec = LossSpec(alpha=ALPHA, chunk_size=chunk_size)
    # The logits are an intermediate nothing else reads, as in the trainer: reuse them for their gradient.
    return distillation_loss(logits, DenseTeacher(teacher_logits), labels, spec, inplace_grad=True).loss


def ours_fused_loss(hidden, weight, teacher_logits, labels, chunk_size):
    from hf_capgap.losses import DenseTeacher, LossSpec, distillation_loss

    spec = LossSpec(alpha=ALPHA, chunk_size=chunk_size)
    return distillation_loss(hidden, DenseTeacher(teacher_logits), labels, spec, lm_head_weight=weight).loss


VARIANTS = {
    "naive": naive_loss,
    "trl": trl_loss,
    "ours-logits": ours_logits_loss,
    "ours-fused": ours_fused_loss,
}


def run_child(variant: str, vocab: int, chunk_size: int, repeats: int) -> dict:
    """Measure one variant in this (fresh) process and return its numbers."""
    torch.set_num_threads(2)
    loss_fn = VARIANTS[variant]
    if variant == "trl":
        from trl.experimental.gkd import GKDTrainer  # noqa: F401  (import cost outside the measurement)
    else:
        import hf_capgap.losses  # noqa: F401
    inputs = make_inputs(vocab)
    hidden = inputs["hidden"].requires_grad_(True)
    weight = inputs["weight"].requires_grad_(True)
    before = peak_rss_bytes()
    times = []
    for _ in range(repeats + 1):
        hidden.grad = None
        weight.grad = None
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, inputs["teacher_logits"], inputs["labels"], chunk_size)
        loss.backward()
        times.append(time.perf_counter() - start)
    # The gradients are outputs every variant must hold, not workspace.
    grad_bytes = hidden.grad.nbytes + weight.grad.nbytes
    return {
        "loss": float(loss.detach()),
        "grad_weight_norm": float(weight.grad.norm()),
        "peak_extra_bytes": peak_rss_bytes() - before,
        "grad_bytes": grad_bytes,
        "seconds": statistics.median(times[1:]),
    }


def accumulation_errors() -> list[tuple[int, float, float]]:
    """(chunks, error of fp32 accumulation rounded to bf16, error of bf16 accumulation) vs the fp64 sum."""
    tokens, hidden, vocab = 16384, 256, 2048
    generator = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(tokens, vocab, generator=generator) * 2, -1) for _ in range(2)]
    grad_logits = (probs[0] - probs[1]).bfloat16()  # q - p, as the loss forms it
    inputs = torch.randn(tokens, hidden, generator=generator).bfloat16()
    exact = grad_logits.double().t() @ inputs.double()
    rows = []
    for chunks in ACCUMULATION_CHUNKS:
        step = tokens // chunks
        in_fp32 = torch.zeros(vocab, hidden)
        in_bf16 = torch.zeros(vocab, hidden, dtype=torch.bfloat16)
        for start in range(0, tokens, step):
            part = slice(start, start + step)
            in_fp32.addmm_(grad_logits[part].float().t(), inputs[part].float())
            in_bf16.addmm_(grad_logits[part].t(), inputs[part])
        errors = [float((w.double() - exact).norm() / exact.norm()) for w in (in_fp32.bfloat16(), in_bf16)]
        rows.append((chunks, *errors))
    return rows


def measure(variant: str, vocab: int, chunk_size: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--vocab", str(vocab), "--chunk-size", str(chunk_size)]
    command += ["--repeats", str(repeats)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def plan() -> list[tuple[str, int | None]]:
    rows: list[tuple[str, int | None]] = [("naive", None), ("trl", None)]
    rows += [(variant, chunk) for variant in ("ours-logits", "ours-fused") for chunk in CHUNK_SIZES]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=sorted(VARIANTS))
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.vocab, args.chunk_size, args.repeats)))
        return

    print(f"distillation loss forward+backward, N={TOKENS} tokens, H={HIDDEN}, fp32, CPU, torch {torch.__version__}")
    print(f"baseline: {BASELINE} (torch F.kl_div + F.cross_entropy on full logits); median of {args.repeats} runs")
    print("peak extra memory: ru_maxrss growth in a fresh subprocess per row, after the inputs are allocated")
    print("(includes the hidden/W gradients every variant must return: 'grads' column)\n")
    goals = []
    for vocab in VOCABS:
        results = {(variant, chunk): measure(variant, vocab, chunk or 1024, args.repeats) for variant, chunk in plan()}
        base = results[(BASELINE, None)]
        print(f"V = {vocab}  (one [N, V] fp32 tensor = {TOKENS * vocab * 4 / 2**20:.0f} MiB)")
        print(
            "| variant | chunk | time ms | time / naive | peak extra MiB | grads MiB | memory / naive | loss | |dW| |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (variant, chunk), result in results.items():
            print(
                f"| {variant} | {chunk or '-'} | {result['seconds'] * 1e3:.0f}"
                f" | {result['seconds'] / base['seconds']:.2f}x"
                f" | {result['peak_extra_bytes'] / 2**20:.0f} | {result['grad_bytes'] / 2**20:.0f}"
                f" | {result['peak_extra_bytes'] / base['peak_extra_bytes']:.3f}x | {result['loss']:.5f}"
                f" | {result['grad_weight_norm']:.5f} |"
            )
        print()
        if vocab == VOCABS[0]:
            for variant, (memory_goal, time_goal) in GOALS.items():
                default = results[(variant, DEFAULT_CHUNK)]
                memory = default["peak_extra_bytes"] / base["peak_extra_bytes"]
                speed = default["seconds"] / base["seconds"]
                met = memory <= memory_goal and speed <= time_goal
                goals.append(
                    f"goal at V={vocab}, {variant} chunk {DEFAULT_CHUNK} (the default): "
                    f"memory <= {memory_goal}x naive "
                    f"and time <= {time_goal}x naive: {memory:.3f}x, {speed:.2f}x ({'met' if met else 'NOT met'})"
                )
    print("\n".join(goals))
    torch.set_num_threads(2)
    print("\nbf16 lm_head gradient accumulated over K chunks (N=16384, H=256, V=2048): relative error vs fp64")
    print("| chunks K | fp32 accumulation, rounded to bf16 once | bf16 accumulation | ratio |")
    print("|---:|---:|---:|---:|")
    for chunks, fp32_error, bf16_error in accumulation_errors():
        print(f"| {chunks} | {fp32_error:.2e} | {bf16_error:.2e} | {bf16_error / fp32_error:.1f}x |")


if __name__ == "__main__":
    main()
