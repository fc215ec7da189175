"""On-policy distillation (issue 22): correctness, speed and memory against TRL, quality on- vs off-policy.

--correctness  our chunked loss against TRL's ``GKDTrainer.generalized_jsd_loss`` on the same random logits
               (2 x 7 tokens, 3 of them -100, vocabulary 37, chunks of 3 rows), dense logits and fused
               lm_head, TRL beta 0 / 1 / 0.5 / 0.1 / 0.9 = our forward_kl / reverse_kl / jsd beta=b, T 1 and 2.
               Ours is T^2 x TRL's (TRL has no T^2). Prints max |ours - T^2 TRL|: value, gradient (dense; fused).

(default)      speed and memory, lmbda=1 (every batch's completions sampled from the student), reverse KL
               (TRL beta=1; our loss="reverse_kl", alpha=1), loss temperature 1, sampling temperature 1,
               no top-k / top-p, fp32, no gradient checkpointing, batch 8, same random LLaMA student and
               teacher (seed 0, vocabulary 8192, the embedded tokenizer), same prompts (the first
               PROMPT_TOKENS tokens of the embedded corpus' train rows as one user turn, ChatML template),
               same max completion length, one optimizer step per batch:

                   gkd          trl.experimental.gkd.GKDTrainer(lmbda=1, beta=1, seq_kd=False); rows as
                                ``messages`` (user turn + a placeholder assistant turn, which lmbda=1 replaces)
                   trl-distill  trl.DistillationTrainer (stable, on-policy only, no vLLM), beta=1,
                                prompt-only conversational rows
                   ours         hf_capgap DistillationTrainer(lmbda=1), same prompt-only rows, the loss's
                                automatic chunk size (512 rows at this vocabulary on CPU)
                   ours-chunk64 the same with chunk_size=64: what a smaller chunk still saves (each chunk
                                holds a few [rows, vocab] buffers, closed-form gradients for every divergence)

               Each arm trains in its own subprocess; arms run interleaved (gkd, trl-distill, ours, gkd, ...)
               --repeats times and the table shows medians. completions/s = completions of the steps after
               the first --warmup steps / their wall time. Peak extra RSS: after the trainer is built (models,
               data and imports loaded), the kernel's peak-RSS counter is reset (``5 > /proc/self/clear_refs``)
               and the current RSS read; peak extra = VmHWM at the end of train() - that RSS.

--quality      student's reverse KL to the teacher on its own samples after the same training, lmbda=1 vs
               lmbda=0, paired over --seeds. Models: the embedded tiny ladder (outputs/ladder/tiny; student
               QUALITY_STUDENT, teacher QUALITY_TEACHER). Rows: prompt = the first PROMPT_TOKENS tokens of a
               corpus train row, completion = its next QUALITY_COMPLETION tokens (plain text); lmbda=0 trains
               on that completion, lmbda=1 replaces it with the student's sample. Same steps, batch and rows
               per seed. Evaluation: 256 held-out prompts (validation rows), the student samples QUALITY_COMPLETION
               tokens (seeded, temperature 1), the metric is sum_v q(v) (log q(v) - log p(v)) per completion
               position (through the first EOS), averaged over completion tokens. The seed sets the data
               order, the sampling and the evaluation draws, not the student's weights (it starts from the
               pretrained ladder student, the post-training setting GKD targets).

    python bench/bench_on_policy.py --correctness
    python bench/bench_on_policy.py [--steps 10 --warmup 2 --repeats 3 --completion 64]
    python bench/bench_on_policy.py --quality [--seeds 0,1,2,3,4 --quality-steps 200]
    python bench/bench_on_policy.py --smoke   # every section at toy sizes in one process: checks it runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 8192
BATCH = 8
PROMPT_TOKENS = 24
OURS_ARMS = ("ours", "ours-chunk64")
ARMS = ("gkd", "trl-distill", *OURS_ARMS)
BASELINES = ("gkd", "trl-distill")
SPEED_GOAL, MEMORY_GOAL = 1.0, 0.5
LIKE_FOR_LIKE = {"bf16": False, "fp16": False, "gradient_checkpointing": False, "per_device_train_batch_size": BATCH}
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LADDER = "outputs/ladder/tiny"
QUALITY_STUDENT, QUALITY_TEACHER = "llama-126K", "llama-418K"
QUALITY_COMPLETION = 48
EVAL_PROMPTS = 256
IN_PROCESS = False  # --smoke: arms run in this process (no fresh-process isolation; its numbers mean nothing)
LENGTH_KEYS = ("completion_length", "completions/mean_length")  # ours / gkd (counted here), trl-distill


def correctness() -> float:
    """Print max |ours - T^2 * TRL| per case; return the largest."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    from hf_capgap.losses import DenseTeacher, FusedTeacher, LossSpec, distillation_loss

    g = torch.Generator().manual_seed(7)
    batch, seq, vocab, hidden = 2, 7, 37, 12
    s_hidden, s_weight = torch.randn(batch, seq, hidden, generator=g), torch.randn(vocab, hidden, generator=g) / 3.5
    t_logits = torch.randn(batch, seq, hidden, generator=g) @ (torch.randn(vocab, hidden, generator=g) / 1.7).T
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :2], labels[1, :4], labels[1, -1] = -100, -100, -100
    print("| TRL beta | ours | T | path | max abs diff value | max abs diff gradient |\n|---:|---|---:|---|---:|---:|")
    worst = 0.0
    for beta in (0.0, 1.0, 0.5, 0.1, 0.9):
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
        for temperature in (1.0, 2.0):
            spec = LossSpec(
                kind, beta=beta if kind == "jsd" else 0.5, temperature=temperature, alpha=1.0, chunk_size=3
            )
            h, w = s_hidden.clone().requires_grad_(True), s_weight.clone().requires_grad_(True)
            logits = h @ w.T
            logits.retain_grad()
            reference = GKDTrainer.generalized_jsd_loss(logits, t_logits, labels, beta=beta, temperature=temperature)
            (temperature**2 * reference).backward()
            dense = logits.detach().reshape(-1, vocab).requires_grad_(True)
            out = distillation_loss(dense, DenseTeacher(t_logits.reshape(-1, vocab)), labels.reshape(-1), spec)
            out.loss.backward()
            rows = [("dense", out.loss, [(dense.grad, logits.grad.reshape(-1, vocab))])]
            fh, fw = s_hidden.reshape(-1, hidden).clone().requires_grad_(True), s_weight.clone().requires_grad_(True)
            teacher = FusedTeacher(t_logits.reshape(-1, vocab), torch.eye(vocab))  # the teacher's logits as hidden
            out = distillation_loss(fh, teacher, labels.reshape(-1), spec, lm_head_weight=fw)
            out.loss.backward()
            rows.append(("fused", out.loss, [(fh.grad, h.grad.reshape(-1, hidden)), (fw.grad, w.grad)]))
            for path, loss, grads in rows:
                value = abs(loss.item() - temperature**2 * reference.item())
                gradient = max((a - b).abs().max().item() for a, b in grads)
                worst = max(worst, value, gradient)
                print(f"| {beta} | {spec.kind} | {temperature:g} | {path} | {value:.1e} | {gradient:.1e} |")
    print(f"\nlargest difference {worst:.1e} (goal <= 1e-5: {'met' if worst <= 1e-5 else 'NOT met'})")
    return worst


def rss_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def corpus_prompts(rows: int, tokenizer, split: str = "train", offset: int = 0) -> list[tuple[str, list[int]]]:
    """(prompt text, the row's token ids) for the first ``rows`` corpus rows with enough tokens."""
    from hf_capgap.data import load_corpus

    out = []
    for text in load_corpus()[split]["text"][offset:]:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= PROMPT_TOKENS + QUALITY_COMPLETION:
            out.append((tokenizer.decode(ids[:PROMPT_TOKENS]), ids))
        if len(out) == rows:
            return out
    raise ValueError(f"the corpus' {split} split has fewer than {rows} rows that long")


def speed_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden: int, layers: int, heads: int) -> LlamaForCausalLM:
        shape = {"hidden_size": hidden, "intermediate_size": 8 * hidden // 3, "num_hidden_layers": layers}
        attention = {"num_attention_heads": heads, "num_key_value_heads": heads}
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # the embedded tokenizer's
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False, **shape, **attention, **ids
            )
        )

    torch.manual_seed(0)
    return llama(hidden=256, layers=4, heads=4), llama(hidden=128, layers=2, heads=2)


def common_args(output_dir: str, steps: int) -> dict:
    run = {"output_dir": output_dir, "max_steps": steps, "learning_rate": 1e-4, "logging_steps": 1, "seed": 0}
    quiet = {"save_strategy": "no", "report_to": [], "disable_tqdm": True, "dataloader_num_workers": 0}
    return {**LIKE_FOR_LIKE, **run, **quiet, "use_cpu": True}


def speed_trainer(arm: str, output_dir: str, steps: int, completion: int):
    import datasets

    from hf_capgap.data import default_tokenizer

    teacher, student = speed_models()
    tokenizer = default_tokenizer(VOCAB)
    tokenizer.chat_template = CHATML
    prompts = [[{"role": "user", "content": text}] for text, _ in corpus_prompts(steps * BATCH, tokenizer)]
    common = common_args(output_dir, steps)
    if arm == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        rows = [[*prompt, {"role": "assistant", "content": "placeholder"}] for prompt in prompts]
        dataset = datasets.Dataset.from_dict({"messages": rows})
        args = GKDConfig(
            **common, lmbda=1.0, beta=1.0, seq_kd=False, temperature=1.0, max_new_tokens=completion, max_length=256
        )
        trainer_class = GKDTrainer
    elif arm == "trl-distill":
        from trl import DistillationConfig, DistillationTrainer

        dataset = datasets.Dataset.from_dict({"prompt": prompts})
        args = DistillationConfig(
            **common, beta=1.0, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=completion
        )
        trainer_class = DistillationTrainer
    else:
        from hf_capgap import DistillationConfig, DistillationTrainer

        dataset = datasets.Dataset.from_dict({"prompt": prompts})
        args = DistillationConfig(
            **common,
            loss="reverse_kl",
            alpha=1.0,
            temperature=1.0,
            lmbda=1.0,
            max_completion_length=completion,
            sampling_temperature=1.0,
            chunk_size=64 if arm == "ours-chunk64" else None,
        )
        trainer_class = DistillationTrainer
    trainer = trainer_class(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer, sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters())


def count_gkd_completions(trainer, logs: list[dict]) -> None:
    """Record each generated batch's mean completion length (GKDTrainer does not log it): labelled tokens per row."""
    generate = trainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        input_ids, attention_mask, labels = generate(model, inputs, generation_config)
        logs.append({"completion_length": float((labels != -100).sum(dim=1).float().mean())})
        return input_ids, attention_mask, labels

    trainer.generate_on_policy_outputs = counted


def speed_child(arm: str, steps: int, warmup: int, completion: int) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(1)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.logs: list[dict] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, teacher_params, student_params = speed_trainer(arm, output_dir, steps, completion)
        clock = StepClock()
        trainer.add_callback(clock)
        if arm == "gkd":
            count_gkd_completions(trainer, clock.logs)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
        before = rss_kib("VmRSS")
        result = trainer.train()
        peak_extra = (rss_kib("VmHWM") - before) * 1024
    timed = len(clock.times) - warmup
    lengths = [log[key] for log in clock.logs for key in LENGTH_KEYS if key in log]
    return {
        "completions_per_s": timed * BATCH / (clock.times[-1] - clock.times[warmup - 1]),
        "peak_extra_bytes": peak_extra,
        "train_loss": result.training_loss,
        "completion_length": statistics.mean(lengths) if lengths else None,
        "teacher_params": teacher_params,
        "student_params": student_params,
        "settings": {key: getattr(trainer.args, key) for key in LIKE_FOR_LIKE},
    }


def child(section: str, *options: str) -> dict:
    """Run one arm in a fresh subprocess (in this one for --smoke, which only checks that every path runs)."""
    if IN_PROCESS:
        return run_child(argument_parser().parse_args(["--child", section, *options]))
    command = [sys.executable, os.path.abspath(__file__), "--child", section, *options]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode:
        sys.stderr.write(completed.stderr[-4000:])
        raise RuntimeError(f"child {section} {options} failed ({completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def speed(arms: tuple[str, ...], steps: int, warmup: int, repeats: int, completion: int) -> None:
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _ in range(repeats):  # interleaved: each repeat runs every arm once, in the same order
        for arm in arms:
            runs[arm].append(
                child(arm, "--steps", str(steps), "--warmup", str(warmup), "--completion", str(completion))
            )
    first = runs[arms[0]][0]
    print(
        f"on-policy training, CPU, lmbda=1, reverse KL, batch {BATCH}, prompts {PROMPT_TOKENS} corpus tokens "
        f"(ChatML user turn), max completion {completion} tokens, {steps - warmup} timed steps after {warmup} "
        f"warm-up, teacher {first['teacher_params'] / 1e6:.2f}M / student {first['student_params'] / 1e6:.2f}M "
        f"params (vocab {VOCAB}), {repeats} interleaved repeats per arm, "
        f"{'in this process (smoke)' if IN_PROCESS else 'one fresh process each'}, medians shown"
    )
    print("settings as each trainer read them:", {arm: runs[arm][0]["settings"] for arm in arms})
    print(
        "peak extra RSS: VmHWM after train() - VmRSS just before it (peak counter reset via /proc/self/clear_refs)\n"
    )
    median = {
        arm: {
            key: statistics.median(run[key] for run in runs[arm]) for key in ("completions_per_s", "peak_extra_bytes")
        }
        for arm in arms
    }
    bases = [base for base in BASELINES if base in median]
    header = "".join(f" speed vs {base} | memory vs {base} |" for base in bases)
    print(f"| arm | completions/s (runs) | peak extra MiB (runs) |{header}")
    print("|---|---|---|" + "---:|---:|" * len(bases))
    for arm in arms:
        speeds = ", ".join(f"{run['completions_per_s']:.1f}" for run in runs[arm])
        memories = ", ".join(f"{run['peak_extra_bytes'] / 2**20:.0f}" for run in runs[arm])
        ratios = "".join(
            f" {median[arm]['completions_per_s'] / median[base]['completions_per_s']:.2f}x |"
            f" {median[arm]['peak_extra_bytes'] / median[base]['peak_extra_bytes']:.2f}x |"
            for base in bases
        )
        print(
            f"| {arm} | {median[arm]['completions_per_s']:.1f} ({speeds}) | "
            f"{median[arm]['peak_extra_bytes'] / 2**20:.0f} ({memories}) |{ratios}"
        )
    lengths = {arm: runs[arm][0]["completion_length"] for arm in arms if runs[arm][0]["completion_length"]}
    print(f"\nmean completion length as logged (first run): {lengths or 'not logged by these arms'}")
    best = {arm: max(run["completions_per_s"] for run in runs[arm]) for arm in arms}  # the least disturbed run
    print("best run's completions/s (other jobs slow runs down, never up):", {a: f"{v:.1f}" for a, v in best.items()})
    for ours in (arm for arm in OURS_ARMS if arm in median):
        for base in bases:
            speed_ratio = median[ours]["completions_per_s"] / median[base]["completions_per_s"]
            memory_ratio = median[ours]["peak_extra_bytes"] / median[base]["peak_extra_bytes"]
            met = speed_ratio >= SPEED_GOAL and memory_ratio <= MEMORY_GOAL
            print(
                f"goal {ours} vs {base}: >= {SPEED_GOAL}x completions/s and <= {MEMORY_GOAL}x peak extra RSS: "
                f"{speed_ratio:.2f}x, {memory_ratio:.2f}x ({'met' if met else 'NOT met'})"
            )


def ladder_model(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(f"{LADDER}/{name}", dtype="float32")


def reverse_kl_on_own_samples(student, teacher, tokenizer, seed: int, completion: int) -> float:
    """Mean over student-sampled completion tokens of KL(q_student || p_teacher) at each position."""
    import torch
    import torch.nn.functional as F

    prompts = [text for text, _ in corpus_prompts(EVAL_PROMPTS, tokenizer, split="validation")]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    student.eval()
    torch.manual_seed(10_000 + seed)
    with torch.no_grad():
        sequences = student.generate(
            **batch, max_new_tokens=completion, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        prompt_length = batch["input_ids"].shape[1]
        new = sequences[:, prompt_length:]
        ended = (new == tokenizer.eos_token_id).int().cumsum(dim=1)
        keep = (ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))  # through the first EOS
        attention = torch.cat([batch["attention_mask"], keep.long()], dim=1)
        inputs = {"attention_mask": attention, "position_ids": (attention.cumsum(dim=1) - 1).clamp(min=0)}
        positions = slice(prompt_length - 1, -1)  # the logits that predict each completion token
        log_q = F.log_softmax(student(sequences, **inputs).logits[:, positions], dim=-1)
        log_p = F.log_softmax(teacher(sequences, **inputs).logits[:, positions], dim=-1)
        per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return float(per_token[keep].mean())


def quality_child(lmbda: float, seed: int, steps: int, completion: int) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer

    from hf_capgap import DistillationConfig, DistillationTrainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(f"{LADDER}/{QUALITY_STUDENT}")
    rows = corpus_prompts(steps * BATCH, tokenizer)
    completions = [tokenizer.decode(ids[PROMPT_TOKENS : PROMPT_TOKENS + completion]) for _, ids in rows]
    dataset = datasets.Dataset.from_dict({"prompt": [text for text, _ in rows], "completion": completions})
    student, teacher = ladder_model(QUALITY_STUDENT), ladder_model(QUALITY_TEACHER)
    before = reverse_kl_on_own_samples(student, teacher, tokenizer, seed, completion) if lmbda == 0 else None
    logs: list[dict] = []
    with tempfile.TemporaryDirectory() as output_dir:
        args = DistillationConfig(
            **{**common_args(output_dir, steps), "seed": seed, "learning_rate": 1e-3},
            loss="reverse_kl",
            alpha=1.0,
            temperature=1.0,
            lmbda=lmbda,
            max_completion_length=completion,
            sampling_temperature=1.0,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    after = reverse_kl_on_own_samples(trainer.model, teacher, tokenizer, seed, completion)
    tokens = [entry.get("completion_length") for entry in logs]
    if lmbda == 0:
        # the dataset's completions, as the trainer tokenised them: prompt + completion minus the prompt
        tokens = [
            len(tokenizer(p + c)["input_ids"]) - len(tokenizer(p)["input_ids"])
            for p, c in zip(dataset["prompt"], dataset["completion"], strict=True)
        ]
    student_tokens = round(sum(tokens) * (1 if lmbda == 0 else BATCH)) if all(t is not None for t in tokens) else None
    return {"reverse_kl": after, "before": before, "student_tokens": student_tokens}


def quality(seeds: list[int], steps: int, completion: int) -> None:
    results = {}
    for seed in seeds:
        for lmbda in (1.0, 0.0):
            options = (
                "--lmbda",
                str(lmbda),
                "--seed",
                str(seed),
                "--steps",
                str(steps),
                "--completion",
                str(completion),
            )
            results[seed, lmbda] = child("quality", *options)
    print(
        f"quality: student {QUALITY_STUDENT}, teacher {QUALITY_TEACHER} (tiny ladder), reverse KL loss, alpha=1, "
        f"{steps} steps x batch {BATCH}, completions {completion} tokens, evaluated on {EVAL_PROMPTS} held-out "
        "prompts: KL(student || teacher) per student-sampled completion token (nats)\n"
    )
    print(
        "| seed | before training | lmbda=1 (on-policy) | lmbda=0 (off-policy) | on - off | student tokens on / off |"
    )
    print("|---:|---:|---:|---:|---:|---|")
    differences = []
    for seed in seeds:
        on, off = results[seed, 1.0], results[seed, 0.0]
        differences.append(on["reverse_kl"] - off["reverse_kl"])
        print(
            f"| {seed} | {off['before']:.4f} | {on['reverse_kl']:.4f} | {off['reverse_kl']:.4f} | "
            f"{differences[-1]:+.4f} | {on['student_tokens']} / {off['student_tokens']} |"
        )
    mean = statistics.mean(differences)
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    verdict = (
        "on-policy lower"
        if mean + 2 * error < 0
        else "on-policy higher"
        if mean - 2 * error > 0
        else "no clear difference"
    )
    print(f"\npaired difference on - off: {mean:+.4f} +- {error:.4f} (standard error, {len(seeds)} seeds): {verdict}")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--correctness", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="every section at toy sizes, in one process")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--quality-steps", type=int, default=200)
    parser.add_argument("--child", choices=(*ARMS, "quality"))
    parser.add_argument("--lmbda", type=float)
    parser.add_argument("--seed", type=int)
    return parser


def run_child(args: argparse.Namespace) -> dict:
    if args.child == "quality":
        return quality_child(args.lmbda, args.seed, args.steps, args.completion)
    return speed_child(args.child, args.steps, args.warmup, args.completion)


def main() -> None:
    global IN_PROCESS, EVAL_PROMPTS
    args = argument_parser().parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
    elif args.smoke:
        IN_PROCESS, EVAL_PROMPTS = True, 8
        correctness()
        speed(tuple(args.arms.split(",")), steps=2, warmup=1, repeats=1, completion=8)
        quality([0], steps=2, completion=8)
    elif args.correctness:
        correctness()
    elif args.quality:
        quality([int(seed) for seed in args.seeds.split(",")], args.quality_steps, QUALITY_COMPLETION)
    else:
        speed(tuple(args.arms.split(",")), args.steps, args.warmup, args.repeats, args.completion)


if __name__ == "__main__":
    main()
