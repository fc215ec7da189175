"""Distilling from a teacher cache vs an online teacher: student quality and training speed.

One run, CPU fp32, on the embedded corpus (``hf_capgap.data``: default BPE tokenizer, vocabulary
8192, rows packed to --seq-len tokens):

1. A tiny LLaMA teacher is trained from scratch with plain cross-entropy (--teacher-steps).
2. The same student initialisation is distilled for --steps steps (alpha = 1: pure forward KL, so
   the teacher signal is all the student learns from, same data order) from
   online (baseline)  the teacher model run at every step, full distribution;
   topk k             a TeacherCache with the k most likely tokens + exact tail mass;
   sampled k          a TeacherCache with k unbiased draws per position.
   Quality: the student's cross-entropy on the held-out split; ratio against online.
   Top-k bias: the KL(teacher || student) of the full distributions on held-out rows, which is the
   quantity the online loss minimises and the top-k bucketing only approximates.
3. Speed: tokens/s of training steps after --warmup (cache build time excluded; it is paid once per
   teacher and reused by every student) against plain cross-entropy training of the same student
   (transformers.Trainer, model's own loss, no teacher: baseline for speed). Each variant is trained
   --speed-rounds times, the rounds interleaved across variants, and the median is reported, so a
   burst of load on a shared machine hits every variant alike.

    python bench/bench_cache_training.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_capgap import DistillationConfig, DistillationTrainer, TeacherCache
from hf_capgap.collate import CausalLMCollator
from hf_capgap.data import default_tokenizer, load_corpus, tokenize_and_pack

VOCAB = 8192
BATCH = 8
CACHES = (("topk", 8), ("topk", 64), ("sampled", 8), ("sampled", 64))
QUALITY_GOAL = 0.01
SPEED_GOAL = 0.9


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def tokens_per_s(self, warmup: int, tokens_per_step: int) -> float:
        return (len(self.times) - warmup) * tokens_per_step / (self.times[-1] - self.times[warmup - 1])


def llama(hidden: int, layers: int, seed: int, seq_len: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def training_args(output_dir: str, steps: int, cls=TrainingArguments, **extra):
    return cls(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=3e-3,
        warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine",
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **extra,
    )


def train_plain(model, rows, tokenizer, output_dir: str, steps: int) -> StepClock:
    clock = StepClock()
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, steps),
        train_dataset=rows,
        data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=[clock],
    )
    trainer.train()
    return clock


def distill(student, rows, tokenizer, output_dir: str, steps: int, *, teacher=None, cache: str | None = None):
    clock = StepClock()
    args = training_args(
        output_dir, steps, cls=DistillationConfig, loss="forward_kl", alpha=1.0, teacher_cache=cache
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    return clock


@torch.no_grad()
def held_out(student, teacher, rows) -> tuple[float, float]:
    """(student cross-entropy, KL(teacher || student)) per predicted token on ``rows``."""
    student.eval()
    ids = torch.tensor(rows["input_ids"], dtype=torch.long)
    ce_sum = kl_sum = 0.0
    for batch in ids.split(BATCH):
        student_logits = student(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB)
        teacher_logits = teacher(input_ids=batch).logits[:, :-1].reshape(-1, VOCAB)
        targets = batch[:, 1:].reshape(-1)
        ce_sum += float(F.cross_entropy(student_logits, targets, reduction="sum"))
        log_q = F.log_softmax(student_logits, dim=-1)
        log_p = F.log_softmax(teacher_logits, dim=-1)
        kl_sum += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return ce_sum / tokens, kl_sum / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--speed-rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)

    tokenizer = default_tokenizer(VOCAB)
    packed = tokenize_and_pack(load_corpus(), tokenizer, args.seq_len)
    train_rows = packed["train"].select(range(max(args.teacher_steps, args.steps) * BATCH))
    student_rows = train_rows.select(range(args.steps * BATCH))
    eval_rows = packed["validation"].select(range(args.eval_rows))
    tokens_per_step = BATCH * args.seq_len

    def student() -> LlamaForCausalLM:
        return llama(hidden=64, layers=2, seed=1, seq_len=args.seq_len)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        teacher = llama(hidden=128, layers=4, seed=0, seq_len=args.seq_len)
        train_plain(teacher, train_rows, tokenizer, str(work / "teacher"), args.teacher_steps)
        teacher.eval()
        teacher_ce, _ = held_out(teacher, teacher, eval_rows)

        runs = {
            "plain CE (no teacher)": lambda model, out: train_plain(model, student_rows, tokenizer, out, args.steps),
            "online": lambda model, out: distill(model, student_rows, tokenizer, out, args.steps, teacher=teacher),
        }
        for mode, k in CACHES:
            path = work / f"cache-{mode}-{k}"
            TeacherCache.build(teacher, student_rows, path, mode=mode, k=k, tokenizer=tokenizer, progress=False)
            runs[f"{mode} k={k}"] = lambda model, out, path=str(path): distill(
                model, student_rows, tokenizer, out, args.steps, cache=path
            )

        for round_index in range(args.speed_rounds):
            for name, run in runs.items():
                model = student()
                clock = run(model, str(work / f"run-{round_index}"))
                result = results.setdefault(name, {"model": model, "speeds": []})
                result["speeds"].append(clock.tokens_per_s(args.warmup, tokens_per_step))

        for result in results.values():
            result["ce"], result["kl"] = held_out(result["model"], teacher, eval_rows)
            result["tokens_per_s"] = statistics.median(result["speeds"])

    online, plain = results["online"], results["plain CE (no teacher)"]
    print(
        f"student {sum(p.numel() for p in plain['model'].parameters()) / 1e6:.2f}M params distilled for {args.steps} "
        f"steps (batch {BATCH} x seq {args.seq_len}, alpha=1 forward KL) from a "
        f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M teacher trained {args.teacher_steps} steps "
        f"(held-out CE {teacher_ce:.4f}); held-out: {args.eval_rows} validation rows"
    )
    print("quality baseline: online teacher; speed baseline: plain CE training of the same student")
    print(f"tokens/s over steps after the first {args.warmup}, median of {args.speed_rounds} interleaved rounds; "
          "cache build time excluded\n")
    print("| student trained with | held-out CE | CE / online | held-out KL(teacher||student) | KL / online |"
          " tokens/s | (min-max over rounds) | speed / plain CE |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, result in results.items():
        print(
            f"| {name} | {result['ce']:.4f} | {result['ce'] / online['ce']:.4f} | {result['kl']:.4f}"
            f" | {result['kl'] / online['kl']:.3f} | {result['tokens_per_s']:.0f}"
            f" | {min(result['speeds']):.0f}-{max(result['speeds']):.0f}"
            f" | {result['tokens_per_s'] / plain['tokens_per_s']:.2f}x |"
        )
    topk64 = results["topk k=64"]
    gap = topk64["ce"] / online["ce"] - 1
    speed = topk64["tokens_per_s"] / plain["tokens_per_s"]
    print(f"\ngoal topk k=64 held-out CE within {QUALITY_GOAL:.0%} of online: {gap:+.2%} "
          f"({'met' if abs(gap) <= QUALITY_GOAL else 'NOT met'})")
    print(f"goal cache (topk k=64) training >= {SPEED_GOAL}x plain CE tokens/s: {speed:.2f}x "
          f"({'met' if speed >= SPEED_GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
