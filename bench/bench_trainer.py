"""End-to-end training throughput and peak memory: DistillationTrainer vs TRL's GKDTrainer.

Same tiny LLaMA teacher and student (random init, seed 0), same packed rows of random token ids
(vocabulary 8192, seq 128, batch 8, no padding), same optimizer settings. Like for like: both sides
set precision (fp32: bf16 and fp16 off), gradient checkpointing (off), batch and sequence length
explicitly (GKDConfig's own defaults are bf16=True and gradient_checkpointing=True), and the header
prints each side's settings as its trainer read them. Per step:

    gkd (baseline)  trl.experimental.gkd.GKDTrainer, off-policy: lmbda=0 (never generates from the
                    student), seq_kd=False (never generates from the teacher), beta=0 (its
                    generalized_jsd_loss is then F.kl_div(student_log_probs, teacher_log_probs,
                    log_target=True) = forward KL(teacher || student)), temperature 1. Teacher and
                    student return full [B, L, V] logits; the loss is formed on them; no CE term.
                    Rows reach it through TRL's DataCollatorForLanguageModeling (input_ids,
                    attention_mask, labels = input_ids), the same collator DistillationTrainer uses.
    ours alpha=1    hf_capgap DistillationTrainer, loss=forward_kl, alpha=1 (no CE: the same objective
                    as gkd), online teacher, fused lm_head on both sides (auto) and the chunked loss.
    ours alpha=0.5  the MiniMA default: 0.5 * forward KL + 0.5 * CE.

Then both trainers on one chat dataset (``messages``: single-turn conversations of random words,
ChatML template) with the loss on the assistant reply only: ours with ``assistant_only_loss=True``,
GKDTrainer with its own DataCollatorForChatML (loss on the last, here the only, assistant turn).
Rows differ in length, so that pair reports conversations/s (same conversations, same order).

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
MESSAGES_VARIANTS = ("gkd-messages", "ours-messages")
# Set on both sides, explicitly: precision, gradient checkpointing, batch and sequence length.
LIKE_FOR_LIKE = {"bf16": False, "fp16": False, "gradient_checkpointing": False, "per_device_train_batch_size": BATCH}
CHATML = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
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


def build_messages(rows: int):
    """Single-turn conversations of random corpus words: a short user turn, a longer assistant reply."""
    import datasets
    import torch

    from hf_capgap.data import load_corpus

    words = load_corpus()["train"]["text"][0].split()
    generator = torch.Generator().manual_seed(0)

    def sentence(length: int) -> str:
        return " ".join(words[i] for i in torch.randint(0, len(words), (length,), generator=generator).tolist())

    conversations = [
        [{"role": "user", "content": sentence(6)}, {"role": "assistant", "content": sentence(15 + row % 16)}]
        for row in range(rows)
    ]
    return datasets.Dataset.from_dict({"messages": conversations})


def common_args(output_dir: str, steps: int) -> dict:
    return {
        **LIKE_FOR_LIKE,
        "max_length": SEQ_LEN,
        "output_dir": output_dir,
        "max_steps": steps,
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
    from hf_capgap.data import default_tokenizer, make_collator

    teacher, student = build_models()
    tokenizer = default_tokenizer(VOCAB)
    messages = variant.endswith("-messages")
    if messages:
        tokenizer.chat_template = CHATML
        dataset, collator = build_messages(steps * BATCH), None
    else:
        dataset = build_dataset(steps * BATCH)
        collator = make_collator(tokenizer)
    if variant.startswith("gkd"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer_class = GKDTrainer
        args = GKDConfig(**common_args(output_dir, steps), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0)
    else:
        from hf_capgap import DistillationConfig, DistillationTrainer

        trainer_class = DistillationTrainer
        alpha = 0.5 if variant == "ours-alpha0.5" else 1.0
        args = DistillationConfig(
            **common_args(output_dir, steps),
            loss="forward_kl",
            alpha=alpha,
            temperature=1.0,
            assistant_only_loss=messages,
        )
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
    settings = {key: getattr(trainer.args, key) for key in (*LIKE_FOR_LIKE, "max_length")}
    return {
        "settings": settings,
        "rows_per_s": timed_steps * BATCH / seconds,
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
    parser.add_argument("--child", choices=VARIANTS + MESSAGES_VARIANTS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.warmup)))
        return

    results = {variant: measure(variant, args.steps, args.warmup) for variant in VARIANTS + MESSAGES_VARIANTS}
    base = results[BASELINE]
    print(
        f"training throughput, CPU, vocab {VOCAB}, seq {SEQ_LEN}, batch {BATCH}, "
        f"{args.steps - args.warmup} timed steps after {args.warmup} warm-up steps, one fresh process per row"
    )
    for variant, result in results.items():
        print(f"settings as {variant}'s trainer read them: {result['settings']}")
    print(f"teacher {base['teacher_params'] / 1e6:.2f}M params, student {base['student_params'] / 1e6:.2f}M params")
    print(f"baseline: {BASELINE} (trl GKDTrainer, lmbda=0, beta=0, seq_kd=False)")
    print("peak extra memory: ru_maxrss growth over trainer.train()\n")
    print("| variant | tokens/s | speed vs gkd | peak extra MiB | memory vs gkd | train loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, result in [(v, results[v]) for v in VARIANTS]:
        print(
            f"| {variant} | {result['tokens_per_s']:.0f} | {result['tokens_per_s'] / base['tokens_per_s']:.2f}x"
            f" | {result['peak_extra_bytes'] / 2**20:.0f}"
            f" | {result['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}x"
            f" | {result['train_loss']:.4f} |"
        )
    gkd_chat, ours_chat = (results[v] for v in MESSAGES_VARIANTS)
    print("\nsame messages dataset, assistant-only loss (ours assistant_only_loss=True, gkd DataCollatorForChatML):\n")
    print(
        "| variant | conversations/s | speed vs gkd-messages | peak extra MiB | memory vs gkd-messages | train loss |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for variant, result in (("gkd-messages", gkd_chat), ("ours-messages", ours_chat)):
        print(
            f"| {variant} | {result['rows_per_s']:.1f} | {result['rows_per_s'] / gkd_chat['rows_per_s']:.2f}x"
            f" | {result['peak_extra_bytes'] / 2**20:.0f}"
            f" | {result['peak_extra_bytes'] / gkd_chat['peak_extra_bytes']:.2f}x | {result['train_loss']:.4f} |"
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
