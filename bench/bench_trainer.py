"""End-to-end training throughput and peak memory: DistillationTrainer vs TRL's GKDTrainer.

Same tiny LLaMA teacher and student (random init, seed 0), same packed rows of random token ids
(vocabulary 8192, seq 128, batch 8, no padding), same optimizer settings, CPU fp32. Per step:

    gkd (baseline)  trl.experimental.gkd.GKDTrainer, off-policy: lmbda=0 (never generates from the
                    student), seq_kd=False (never generates from the teacher), beta=0 (its
                    generalized_jsd_loss is then F.kl_div(student_log_probs, teacher_log_probs,
                    log_target=True) = forward KL(teacher || student)), temperature 1. Teacher and
                    student return full [B, L, V] logits; the loss is formed on them; no CE term.
                    Rows reach it through hf_capgap's CausalLMCollator (input_ids, attention_mask,
                    labels = input_ids), the same collator DistillationTrainer uses.
    ours alpha=1    hf_capgap DistillationTrainer, loss=forward_kl, alpha=1 (no CE: the same objective
                    as gkd), online teacher, fused lm_head on both sides (auto) and the chunked loss.
    ours alpha=0.5  the MiniMA default: 0.5 * forward KL + 0.5 * CE.

Each variant trains in a fresh subprocess. Tokens/s counts input tokens of the steps after the first
--warmup steps (one rank, no gradient accumulation). Peak extra memory = growth of ru_maxrss (the
kernel's peak RSS) from just before ``trainer.train()`` to its end, so models, data and imports are
excluded and only training's working memory (activations, logits, optimizer state) counts.

    python bench/bench_trainer.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

VOCAB = 8192
SEQ_LEN = 128
BATCH = 8
BASELINE = "gkd"
VARIANTS = ("gkd", "ours-alpha1", "ours-alpha0.5")
SPEED_GOAL = 1.5
MEMORY_GOAL = 0.6


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden: int, layers: int, intermediate: int, heads: int) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=SEQ_LEN,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)

    import torch

    torch.manual_seed(0)
    teacher = llama(hidden=256, layers=2, intermediate=688, heads=4)
    student = llama(hidden=64, layers=2, intermediate=172, heads=2)
    return teacher, student


def build_dataset(rows: int):
    import datasets
    import torch

    ids = torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def common_args(output_dir: str, steps: int) -> dict:
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-3,
        "logging_steps": steps,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": True,
        "seed": 0,
    }


def make_trainer(variant: str, output_dir: str, steps: int):
    from hf_capgap.collate import CausalLMCollator
    from hf_capgap.data import default_tokenizer

    teacher, student = build_models()
    dataset = build_dataset(steps * BATCH)
    tokenizer = default_tokenizer(VOCAB)
    collator = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)
    if variant == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer_class = GKDTrainer
        args = GKDConfig(
            **common_args(output_dir, steps), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_length=SEQ_LEN
        )
    else:
        from hf_capgap import DistillationConfig, DistillationTrainer

        trainer_class = DistillationTrainer
        alpha = 1.0 if variant == "ours-alpha1" else 0.5
        args = DistillationConfig(**common_args(output_dir, steps), loss="forward_kl", alpha=alpha, temperature=1.0)
    trainer = trainer_class(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer, sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters())


def run_child(variant: str, steps: int, warmup: int) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(2)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, teacher_params, student_params = make_trainer(variant, output_dir, steps)
        clock = StepClock()
        trainer.add_callback(clock)
        before = peak_rss_bytes()
        result = trainer.train()
        peak_extra = peak_rss_bytes() - before
    timed_steps = len(clock.times) - warmup
    seconds = clock.times[-1] - clock.times[warmup - 1]
    return {
        "tokens_per_s": timed_steps * BATCH * SEQ_LEN / seconds,
        "peak_extra_bytes": peak_extra,
        "train_loss": result.training_loss,
        "teacher_params": teacher_params,
        "student_params": student_params,
    }


def measure(variant: str, steps: int, warmup: int) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--steps", str(steps), "--warmup", str(warmup)]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.warmup)))
        return

    results = {variant: measure(variant, args.steps, args.warmup) for variant in VARIANTS}
    base = results[BASELINE]
    print(
        f"training throughput, CPU fp32, vocab {VOCAB}, seq {SEQ_LEN}, batch {BATCH}, "
        f"{args.steps - args.warmup} timed steps after {args.warmup} warm-up steps, one fresh process per row"
    )
    print(f"teacher {base['teacher_params'] / 1e6:.2f}M params, student {base['student_params'] / 1e6:.2f}M params")
    print(f"baseline: {BASELINE} (trl GKDTrainer, lmbda=0, beta=0, seq_kd=False)")
    print("peak extra memory: ru_maxrss growth over trainer.train()\n")
    print("| variant | tokens/s | speed vs gkd | peak extra MiB | memory vs gkd | train loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, result in results.items():
        print(
            f"| {variant} | {result['tokens_per_s']:.0f} | {result['tokens_per_s'] / base['tokens_per_s']:.2f}x"
            f" | {result['peak_extra_bytes'] / 2**20:.0f} | {result['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}x"
            f" | {result['train_loss']:.4f} |"
        )
    ours = results["ours-alpha1"]
    speed = ours["tokens_per_s"] / base["tokens_per_s"]
    memory = ours["peak_extra_bytes"] / base["peak_extra_bytes"]
    met = speed >= SPEED_GOAL and memory <= MEMORY_GOAL
    print(
        f"\ngoal ours-alpha1 >= {SPEED_GOAL}x tokens/s and <= {MEMORY_GOAL}x peak extra memory of gkd: "
        f"{speed:.2f}x, {memory:.2f}x ({'met' if met else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
