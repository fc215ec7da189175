"""Distilling from a teacher cache vs an online teacher: bytes, student quality, training and build speed.

One run, CPU fp32, on the embedded corpus (``hf_capgap.data``: BPE tokenizer of --vocab tokens,
default 32,000; rows packed to --seq-len tokens):

1. A LLaMA teacher is trained from scratch with plain cross-entropy (--teacher-steps), or loaded
   when an earlier run with the same settings saved it (``bench_cache_bytes.py`` reuses it too).
2. The same student initialisation is distilled for --steps steps (alpha = 1: pure forward KL, so
   the teacher signal is all the student learns from; same data order) from
   online (baseline)      the teacher model run at every step, full distribution;
   topk k                 a TeacherCache with the k likeliest tokens + exact tail mass;
   sampled k <sampler>    a TeacherCache with k unbiased draws per position (format 4: the distinct
                          ids as varint-coded gaps, the counts of those drawn more than once, the
                          teacher entropy per position), drawn at evenly
                          spaced points from one random offset (systematic, the default) or
                          independently (multinomial, as format 1 did).
   Bytes: on-disk bytes of the teacher signal per labelled position (format 4, measured), and what
   format 1 stored for the same setting (fixed k slots per position: sampled 5k bytes, top-k 4k + 4:
   computed, the format-1 writer is gone). Formats 1-4 store the same multinomial draws, so such a
   student's quality is the same under all of them; only the bytes differ.
   Quality: the student's cross-entropy on held-out rows; ratio against online.
3. Speed: training tokens/s over the steps after --warmup (cache build excluded; it is paid once
   per teacher and reused by every student) against plain cross-entropy training of the same
   student (transformers.Trainer, model's own loss, no teacher: the speed baseline). Build speed:
   tokens/s of ``TeacherCache.build`` over the student's rows (preparation, fingerprints, writing and
   checksums included) against a plain teacher forward over the same batches under inference_mode,
   the best of two runs of each, alternating (BUILD_CACHES). The bench teacher (hidden 128) is almost
   all lm_head, the worst case for the build's per-position work over the vocabulary, so build speed
   is also timed on a wider random-init teacher (--wide-teacher, hidden 512 x 8 layers by default).
4. --student-batch sets the rows per student step (8 by default, 504 labelled positions): a sampled
   cache's gradient noise per step falls with the positions a step averages over, while its mean
   stays the online teacher's, so its quality cost depends on it.

    python bench/bench_cache_training.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_capgap import DistillationConfig, DistillationTrainer, TeacherCache
from hf_capgap.data import default_tokenizer, forward_inputs, load_corpus, make_collator, tokenize_and_pack
from hf_capgap.utils.artifacts import json_sha256

BATCH = 8
CACHES = (
    [("topk", 16, None), ("topk", 64, None)]
    + [("sampled", k, "systematic") for k in (4, 8, 16, 32, 64)]
    + [("sampled", k, "multinomial") for k in (16, 64)]
)
STUDY = ["16:systematic", "32:systematic", "64:systematic"]
"""Sampled caches (draws:sampler) the --student-seeds study compares with online and format 1's sampled-64."""
SPREAD = [(k, "systematic") for k in (8, 16, 32, 64)] + [(k, "multinomial") for k in (16, 32, 64)]
"""Sampled settings rebuilt with other sampling seeds by --draw-seeds."""
BUILD_CACHES = (("topk", 64, None), ("sampled", 16, "systematic"), ("sampled", 32, "systematic"),
                ("sampled", 64, "multinomial"))  # fmt: skip
"""Caches whose build speed is timed against a plain teacher forward (best of two alternating runs)."""
OLD_SAMPLED = "sampled k=64 multinomial"
"""Format 1's sampled-64 (independent draws in 64 fixed slots): the quality the quarter-bytes goal matches."""
BYTES_GOAL, QUALITY_GOAL = 50, 0.005
SPEED_GOAL, BUILD_GOAL = 0.9, 0.8


def format1_bytes(mode: str, k: int) -> int:
    """Signal bytes per position of format 1 (k fixed slots, uint16 ids below 65,536 tokens)."""
    return 5 * k if mode == "sampled" else 4 * k + 4


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def tokens_per_s(self, warmup: int, tokens_per_step: int) -> float:
        return (len(self.times) - warmup) * tokens_per_step / (self.times[-1] - self.times[warmup - 1])


def llama(vocab: int, hidden: int, layers: int, seed: int, seq_len: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def training_args(output_dir: str, steps: int, cls=TrainingArguments, batch: int = BATCH, **extra):
    return cls(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
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


def bench_data(vocab: int, seq_len: int, rows: int, eval_rows: int) -> tuple[Any, Any, Any]:
    """(tokenizer, training rows, held-out rows) of the embedded corpus."""
    tokenizer = default_tokenizer(vocab)
    packed = tokenize_and_pack(load_corpus(), tokenizer, seq_len)
    return tokenizer, packed["train"].select(range(rows)), packed["validation"].select(range(eval_rows))


def trained_teacher(tokenizer, rows, settings: dict, work: Path) -> LlamaForCausalLM:
    """The bench teacher, trained once per settings and saved under ``work`` for later runs."""
    folder = work / f"teacher-{json_sha256(settings)[:12]}"
    if (folder / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(folder).eval()
    teacher = llama(len(tokenizer), settings["hidden"], settings["layers"], seed=0, seq_len=settings["seq_len"])
    Trainer(
        model=teacher,
        args=training_args(str(work / "teacher-run"), settings["steps"]),
        train_dataset=rows.select(range(settings["steps"] * BATCH)),
        data_collator=make_collator(tokenizer, DistillationConfig(report_to=[])),
    ).train()
    teacher.save_pretrained(folder)
    return teacher.eval()


def teacher_settings(args: argparse.Namespace) -> dict:
    return {"vocab": args.vocab, "seq_len": args.seq_len, "hidden": args.teacher_hidden, "layers": args.teacher_layers,
            "steps": args.teacher_steps, "batch": BATCH}  # fmt: skip


def bench_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "hf_capgap" / "bench")
    return parser


def train_plain(model, rows, tokenizer, output_dir: str, steps: int, batch: int) -> StepClock:
    clock = StepClock()
    collator = make_collator(tokenizer, DistillationConfig(report_to=[]))
    Trainer(
        model=model,
        args=training_args(output_dir, steps, batch=batch),
        train_dataset=rows,
        data_collator=collator,
        callbacks=[clock],
    ).train()
    return clock


def distill(student, rows, tokenizer, config, *, teacher=None) -> StepClock:
    clock = StepClock()
    DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=rows, processing_class=tokenizer,
        callbacks=[clock],
    ).train()  # fmt: skip
    return clock


@torch.inference_mode()
def plain_forward_seconds(teacher, rows, tokenizer, config, batch_size: int) -> float:
    """Seconds of the teacher's forward over ``rows`` in the cache build's batches (the build's floor)."""
    from hf_capgap.data import prepare_dataset

    prepared = prepare_dataset(rows, tokenizer, config)
    collator = make_collator(tokenizer, config)
    start = time.perf_counter()
    for low in range(0, len(prepared), batch_size):
        batch = collator([prepared[i] for i in range(low, min(low + batch_size, len(prepared)))])
        teacher(**forward_inputs(batch), use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def held_out(student, teacher, rows) -> tuple[float, float]:
    """(student cross-entropy, KL(teacher || student)) per predicted token on ``rows``."""
    student.eval()
    ids = torch.tensor(rows["input_ids"], dtype=torch.long)
    ce_sum = kl_sum = 0.0
    for batch in ids.split(BATCH):
        student_logits = student(input_ids=batch).logits[:, :-1].flatten(0, 1)
        teacher_logits = teacher(input_ids=batch).logits[:, :-1].flatten(0, 1)
        ce_sum += float(F.cross_entropy(student_logits, batch[:, 1:].reshape(-1), reduction="sum"))
        log_q, log_p = F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
        kl_sum += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return ce_sum / tokens, kl_sum / tokens


def teacher_sharpness(teacher, rows) -> tuple[float, float]:
    """(mean entropy in nats, mean probability mass of the top 64 tokens) of the teacher on ``rows``."""
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor(rows["input_ids"][:16])).logits[:, :-1].flatten(0, 1)
    log_p = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    return float(entropy), float(log_p.exp().topk(64, dim=-1).values.sum(-1).mean())


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--student-batch",
        type=int,
        default=BATCH,
        help="rows per student step (the teacher always trains on batches of %(default)s)",
    )
    parser.add_argument("--build-batch", type=int, default=32)
    parser.add_argument(
        "--wide-teacher",
        type=int,
        nargs=2,
        default=(512, 8),
        metavar=("HIDDEN", "LAYERS"),
        help="also time cache builds on a random-init teacher of this shape, whose forward, as in real LMs, "
        "weighs more than its 32k-vocabulary head (the bench teacher's hidden 128 makes it almost all head)",
    )
    parser.add_argument("--wide-rows", type=int, default=128, help="rows the wide-teacher builds cover")
    parser.add_argument(
        "--draw-seeds",
        type=int,
        default=0,
        help="also distil from sampled caches of 16, 32 and 64 draws built with this many other sampling seeds, "
        "and print each one's held-out CE over seeds (tells draw noise from a real quality gap)",
    )
    parser.add_argument(
        "--student-seeds",
        type=int,
        default=0,
        help="also distil other student initialisations (each with its own sampling seed) from the online teacher and "
        "sampled 16/32/64-draw caches, and print each setting's held-out CE difference to online and to "
        "format 1's sampled-64 per initialisation, with its mean and standard error",
    )
    parser.add_argument(
        "--study-signals",
        nargs="+",
        default=STUDY,
        metavar="DRAWS:SAMPLER",
        help="sampled caches of the --student-seeds study, besides online and 64:multinomial",
    )
    parser.add_argument(
        "--study-only",
        action="store_true",
        help="run only the --student-seeds study (with longer --steps, say), not the tables before it",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    settings = teacher_settings(args)
    rows = max(args.teacher_steps * BATCH, args.steps * args.student_batch)
    tokenizer, train_rows, eval_rows = bench_data(args.vocab, args.seq_len, rows, args.eval_rows)
    student_rows = train_rows.select(range(args.steps * args.student_batch))
    tokens_per_step = args.student_batch * args.seq_len
    work = args.work
    teacher = trained_teacher(tokenizer, train_rows, settings, work)
    teacher_ce, _ = held_out(teacher, teacher, eval_rows)
    entropy, top64 = teacher_sharpness(teacher, eval_rows)

    def config(name: str, **extra) -> DistillationConfig:
        return training_args(str(work / f"run-{name}"), args.steps, cls=DistillationConfig, loss="forward_kl",
                             alpha=1.0, batch=args.student_batch, **extra)  # fmt: skip

    def student(seed: int = 1) -> LlamaForCausalLM:
        return llama(len(tokenizer), hidden=64, layers=2, seed=seed, seq_len=args.seq_len)

    if args.study_only:
        print(
            f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params, held-out CE {teacher_ce:.3f}, "
            f"mean entropy {entropy:.2f} nats; students distilled {args.steps} steps "
            f"(batch {args.student_batch} x seq "
            f"{args.seq_len}, alpha=1 forward KL); held-out: {args.eval_rows} validation rows"
        )
        print_student_seed_study(args.student_seeds, args.study_signals, {}, teacher, student, student_rows, tokenizer,
                                 config, work, args.build_batch, eval_rows)  # fmt: skip
        print(f"\nwall time {time.perf_counter() - started:.0f} s")
        return
    results: dict[str, dict] = {}
    model = student()
    results["plain CE (no teacher)"] = {
        "clock": train_plain(model, student_rows, tokenizer, str(work / "run-plain"), args.steps, args.student_batch),
        "model": model,
    }
    model = student()
    results["online"] = {
        "clock": distill(model, student_rows, tokenizer, config("online"), teacher=teacher),
        "model": model,
    }
    for mode, k, sampler in CACHES:
        name = f"{mode} k={k}" + (f" {sampler}" if sampler else "")
        with tempfile.TemporaryDirectory(dir=work) as caches:
            path = Path(caches) / "cache"
            cache = TeacherCache.build(teacher, student_rows, path, tokenizer=tokenizer, args=config(name), mode=mode,
                                       k=k, sampler=sampler or "systematic", batch_size=args.build_batch,
                                       progress=False)  # fmt: skip
            model = student()
            clock = distill(model, student_rows, tokenizer, config(name, teacher_cache=str(path)))
        results[name] = {"clock": clock, "model": model, "bytes": cache.bytes_per_token,
                         "format1": format1_bytes(mode, k)}  # fmt: skip

    for result in results.values():
        result["ce"], result["kl"] = held_out(result["model"], teacher, eval_rows)
        result["tokens_per_s"] = result["clock"].tokens_per_s(args.warmup, tokens_per_step)
    online, plain = results["online"], results["plain CE (no teacher)"]

    print(
        f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params, vocabulary {len(tokenizer)}, "
        f"trained {args.teacher_steps} steps of {BATCH}x{args.seq_len} tokens: held-out CE {teacher_ce:.3f}, mean "
        f"entropy {entropy:.2f} nats, mean top-64 mass {top64:.2f}"
    )
    print(
        f"student {sum(p.numel() for p in plain['model'].parameters()) / 1e6:.1f}M params distilled {args.steps} "
        f"steps (batch {args.student_batch} x seq {args.seq_len}, alpha=1 forward KL); "
        f"held-out: {args.eval_rows} validation rows"
    )
    print("quality baseline: online teacher; training speed baseline: plain CE training of the same student\n")
    print(
        "| student trained with | signal B/token (format 4) | format 1 B/token | held-out CE | CE / online |"
        " KL(teacher||student) / online | train tokens/s / plain CE |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        cached = "bytes" in r
        print(f"| {name} | {r['bytes']:.1f} | {r['format1']} |" if cached else f"| {name} | - | - |", end="")
        print(
            f" {r['ce']:.4f} | {r['ce'] / online['ce']:.4f} | {r['kl'] / online['kl']:.3f} |"
            f" {r['tokens_per_s'] / plain['tokens_per_s']:.2f}x |"
        )

    cached = {name: r for name, r in results.items() if "bytes" in r}
    within = [(r["bytes"], name) for name, r in cached.items()
              if r["bytes"] <= BYTES_GOAL and r["ce"] / online["ce"] - 1 <= QUALITY_GOAL]  # fmt: skip
    print(
        f"\ngoal some setting <= {BYTES_GOAL} B/token with held-out CE within {QUALITY_GOAL:.1%} of online: "
        + (f"met by {', '.join(name for _, name in sorted(within))}" if within else "NOT met")
    )
    old = cached[OLD_SAMPLED]
    matching = [(r["bytes"], name) for name, r in cached.items()
                if r["bytes"] <= old["format1"] / 4 and r["ce"] <= old["ce"]]  # fmt: skip
    print(
        f"goal format-1 sampled-64 quality (CE {old['ce']:.4f}, {old['format1']} B/token) at <= 1/4 of its bytes: "
        + (f"met by {', '.join(f'{name} ({b:.0f} B)' for b, name in sorted(matching))}" if matching else "NOT met")
    )
    slowest = min(cached.items(), key=lambda item: item[1]["tokens_per_s"])
    speed = slowest[1]["tokens_per_s"] / plain["tokens_per_s"]
    print(
        f"goal cache training >= {SPEED_GOAL}x plain CE tokens/s: slowest {slowest[0]} {speed:.2f}x "
        f"({'met' if speed >= SPEED_GOAL else 'NOT met'})"
    )
    print(f"\ncache build speed on the bench teacher, {len(student_rows)} rows:")
    print_build_speed(teacher, student_rows, tokenizer, config, work, args.build_batch)
    hidden, layers = args.wide_teacher
    wide = llama(len(tokenizer), hidden, layers, seed=2, seq_len=args.seq_len).eval()
    print(
        f"\ncache build speed on a random-init teacher of hidden {hidden} x {layers} layers "
        f"({sum(p.numel() for p in wide.parameters()) / 1e6:.0f}M params, vocabulary {len(tokenizer)}), "
        f"{args.wide_rows} rows:"
    )
    print_build_speed(wide, student_rows.select(range(args.wide_rows)), tokenizer, config, work, args.build_batch)
    if args.draw_seeds:
        print_draw_seed_spread(args.draw_seeds, results, teacher, student, student_rows, tokenizer, config, work,
                               args.build_batch, eval_rows, online["ce"])  # fmt: skip
    if args.student_seeds:
        print_student_seed_study(args.student_seeds, args.study_signals, results, teacher, student, student_rows,
                                 tokenizer, config, work, args.build_batch, eval_rows)  # fmt: skip
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


def print_build_speed(teacher, rows, tokenizer, config, work, batch_size: int) -> None:
    """Build tokens/s of each of BUILD_CACHES against a plain forward of ``teacher`` over ``rows``:
    best of two runs of each, alternating, so that a slow spell of a shared machine hits both sides."""
    print(
        f"plain forward {len(rows) * len(rows[0]['input_ids'])} tokens, batch {batch_size}; "
        "best of 2 alternating runs each"
    )
    print("| cache | build tokens/s / plain forward |")
    print("|---|---:|")
    ratios = []
    forward = [plain_forward_seconds(teacher, rows, tokenizer, config("forward"), batch_size)]
    for mode, k, sampler in BUILD_CACHES:
        builds = []
        for _ in range(2):
            forward.append(plain_forward_seconds(teacher, rows, tokenizer, config("forward"), batch_size))
            with tempfile.TemporaryDirectory(dir=work) as caches:
                start = time.perf_counter()
                TeacherCache.build(teacher, rows, Path(caches) / "cache", tokenizer=tokenizer, args=config("build"),
                                   mode=mode, k=k, sampler=sampler or "systematic", batch_size=batch_size,
                                   progress=False)  # fmt: skip
                builds.append(time.perf_counter() - start)
        name = f"{mode} k={k}" + (f" {sampler}" if sampler else "")
        ratios.append(min(forward) / min(builds))
        print(f"| {name} | {ratios[-1]:.2f}x |")
    print(
        f"goal cache build >= {BUILD_GOAL}x plain teacher forward tokens/s: slowest {min(ratios):.2f}x "
        f"({'met' if min(ratios) >= BUILD_GOAL else 'NOT met'})"
    )


def print_draw_seed_spread(
    seeds, results, teacher, student, rows, tokenizer, config, work, batch, eval_rows, online_ce
):
    """Held-out CE of students distilled from sampled caches that differ only in the sampling seed."""
    print(f"\nsampled caches over {seeds + 1} sampling seeds (seed 0 is the table above; same student init):")
    print("| draws | sampler | B/token | held-out CE per seed | mean | mean / online |")
    print("|---:|---|---:|---|---:|---:|")
    means = {}
    for k, sampler in SPREAD:
        first = results.get(f"sampled k={k} {sampler}")
        scores = [] if first is None else [first["ce"]]
        for seed in range(1 if first else 0, seeds + 1):
            with tempfile.TemporaryDirectory(dir=work) as caches:
                path = Path(caches) / "cache"
                name = f"sampled k={k} {sampler} seed {seed}"
                cache = TeacherCache.build(
                    teacher,
                    rows,
                    path,
                    tokenizer=tokenizer,
                    args=config(name),
                    mode="sampled",
                    k=k,
                    sampler=sampler,
                    seed=seed,
                    batch_size=batch,
                    progress=False,
                )
                model = student()
                distill(model, rows, tokenizer, config(name, teacher_cache=str(path)))
            scores.append(held_out(model, teacher, eval_rows)[0])
        mean = sum(scores) / len(scores)
        means[f"{k} {sampler}"] = (cache.bytes_per_token, mean)
        print(
            f"| {k} | {sampler} | {cache.bytes_per_token:.1f} | {', '.join(f'{ce:.4f}' for ce in scores)} |"
            f" {mean:.4f} | {mean / online_ce:.4f} |"
        )
    within = [
        name for name, (size, mean) in means.items() if size <= BYTES_GOAL and mean / online_ce - 1 <= QUALITY_GOAL
    ]
    print(
        f"goal some setting <= {BYTES_GOAL} B/token with held-out CE within {QUALITY_GOAL:.1%} of online, on the "
        f"seed mean: {'met by ' + ', '.join(within) if within else 'NOT met'}"
    )
    old_bytes, old_mean = format1_bytes("sampled", 64), means["64 multinomial"][1]
    matching = [name for name, (size, mean) in means.items() if size <= old_bytes / 4 and mean <= old_mean]
    print(
        f"goal format-1 sampled-64 quality on the seed mean (CE {old_mean:.4f}) at <= {old_bytes / 4:.0f} B/token: "
        f"{'met by ' + ', '.join(matching) if matching else 'NOT met'}"
    )


def print_student_seed_study(
    seeds, signals, results, teacher, student, rows, tokenizer, config, work, batch, eval_rows
):
    """Held-out CE differences between signals, paired by student initialisation (the main table's is the
    first): tells a difference of teacher signal from one of training trajectory."""
    scores: dict[str, list[float]] = {}
    signal_bytes = {name: r["bytes"] for name, r in results.items() if "bytes" in r}
    settings = ["online"] + [
        (int(draws), sampler)
        for draws, sampler in (signal.split(":") for signal in dict.fromkeys(["64:multinomial", *signals]))
    ]
    for setting in settings:
        name = "online" if setting == "online" else f"sampled k={setting[0]} {setting[1]}"
        scores[name] = [results[name]["ce"]] if name in results else []
        for seed in range(len(scores[name]), seeds + 1):
            model = student(seed=1 + seed)
            with tempfile.TemporaryDirectory(dir=work) as caches:
                if setting == "online":
                    distill(model, rows, tokenizer, config(f"{name} init {seed}"), teacher=teacher)
                else:
                    path = Path(caches) / "cache"
                    cache = TeacherCache.build(teacher, rows, path, tokenizer=tokenizer, args=config(name),
                                               mode="sampled", k=setting[0], sampler=setting[1], seed=seed,
                                               batch_size=batch, progress=False)  # fmt: skip
                    signal_bytes.setdefault(name, cache.bytes_per_token)
                    distill(model, rows, tokenizer, config(f"{name} init {seed}", teacher_cache=str(path)))
            scores[name].append(held_out(model, teacher, eval_rows)[0])

    def paired(name: str, reference: str) -> tuple[float, float]:
        """Mean and standard error of the relative CE difference to ``reference``, paired by initialisation."""
        diffs = torch.tensor(
            [a / b - 1 for a, b in zip(scores[name], scores[reference], strict=True)], dtype=torch.float64
        )
        return float(diffs.mean()), float(diffs.std() / len(diffs) ** 0.5)

    old = OLD_SAMPLED
    first = " (the first is the table above)" if results else ""
    print(
        f"\nstudents of {seeds + 1} initialisations{first}, each sampled cache drawn with its own seed; "
        "differences paired by initialisation, mean +- standard error:"
    )
    print("| signal | B/token | held-out CE per initialisation | CE vs online | CE vs format-1 sampled-64 |")
    print("|---|---:|---|---:|---:|")
    for name, values in scores.items():
        versus = [paired(name, reference) if name != reference else None for reference in ("online", old)]
        size = f"{signal_bytes[name]:.1f}" if name in signal_bytes else "-"
        print(
            f"| {name} | {size} | {', '.join(f'{ce:.4f}' for ce in values)} | "
            + " | ".join("-" if v is None else f"{v[0]:+.2%} +- {v[1]:.2%}" for v in versus)
            + " |"
        )
    candidates = [name for name in scores if name not in ("online", old)
                  and signal_bytes[name] <= format1_bytes("sampled", 64) / 4]  # fmt: skip
    matching = [name for name in candidates if paired(name, old)[0] <= 0]
    within = [name for name in scores if name != "online" and signal_bytes[name] <= BYTES_GOAL
              and paired(name, "online")[0] <= QUALITY_GOAL]  # fmt: skip
    print(
        f"goal some setting <= {BYTES_GOAL} B/token with held-out CE within {QUALITY_GOAL:.1%} of online, on the mean "
        f"over initialisations: {'met by ' + ', '.join(within) if within else 'NOT met'}"
    )
    print(
        f"goal format-1 sampled-64 quality at <= {format1_bytes('sampled', 64) / 4:.0f} B/token, on the mean over "
        f"initialisations: {'met by ' + ', '.join(matching) if matching else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
