"""The fused distillation loss and DistillationTrainer on one GPU, against naive torch, TRL and Liger.

    python bench/gpu_check.py           # one CUDA GPU (sized for an H200: under 8 minutes)
    python bench/gpu_check.py --smoke   # tiny shapes on CPU, under a minute: CI runs it so it never rots

1. Loss forward+backward, bf16 student hidden states [N, H] and lm_head [V, H], bf16 teacher hidden
   states and lm_head, forward KL(teacher || student) averaged over tokens (alpha = 1, T = 1):
     naive        full logits both sides; F.kl_div(log_softmax(s), log_softmax(t), log_target=True)
     trl-gkd      full logits; trl GKDTrainer.generalized_jsd_loss(beta=0)
     trl-chunked  trl's DistillationTrainer chunked path (_chunked_divergence_loss, beta=0), no full logits
     liger        liger-kernel LigerFusedLinearJSD(jsd_beta=0), if installed (GPU only)
     ours         hf_capgap distillation_loss, FusedTeacher, automatic chunk (and a chunk-size sweep)
   Peak memory is torch.cuda.max_memory_allocated over what the inputs hold; time is the median of
   three runs after a warm-up. Errors: ours and naive (both bf16) against an fp32 reference on the
   first REFERENCE_ROWS rows: relative error of the loss and of the hidden / weight gradients.
2. End to end: DistillationTrainer vs TRL GKDTrainer (lmbda=0, beta=0, seq_kd=False, temperature 1,
   alpha = 1 on our side: the same objective) on random-init Qwen2-shaped student and teacher, same
   data, same settings (printed in the header); tokens/s and peak GPU memory, each in a fresh process.
3. DistillationTrainer for a few steps under FSDP2 and DeepSpeed ZeRO-3 with one process (teacher
   prepared for inference): that it ran, its peak memory; ZeRO-3 is skipped when deepspeed is absent.
4. TeacherCache.build (sampled 16 draws, systematic; top-64) with the teacher of section 2 over the
   same rows, against a plain teacher forward over the same batches: tokens/s and peak memory (the
   build applies the lm_head a block of positions at a time, so no [batch, seq, vocab] logits); and
   the sampled build asked for every row in one batch (halved on out-of-memory errors to what fits).

On CPU (--smoke) memory columns read n/a, and FSDP2 / ZeRO-3 are skipped (they need CUDA here).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

REFERENCE_ROWS = 2048


@dataclass(frozen=True)
class Model:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class Plan:
    """Everything a run measures; one for the GPU, one for the CPU smoke run."""

    device: str
    loss_shapes: tuple[tuple[int, int, int], ...]  # (N, H, V)
    chunk_sweep: tuple[int, ...]
    vocab: int
    student: Model
    teacher: Model
    seq_len: int
    batch: int
    steps: int
    warmup: int
    bf16: bool
    gradient_checkpointing: bool


GPU = Plan(
    device="cuda",
    loss_shapes=((16384, 3584, 151936), (8192, 4096, 128256)),
    chunk_sweep=(256, 512, 1024, 2048),
    vocab=151936,
    student=Model(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),  # Qwen2.5-0.5B shape
    teacher=Model(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),  # Qwen2.5-1.5B shape
    seq_len=1024,
    batch=8,
    steps=8,
    warmup=2,
    bf16=True,
    gradient_checkpointing=False,
)
SMOKE = Plan(
    device="cpu",
    loss_shapes=((96, 32, 512), (64, 48, 640)),
    chunk_sweep=(16, 32),
    vocab=1024,
    student=Model(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64),
    teacher=Model(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96),
    seq_len=32,
    batch=4,
    steps=3,
    warmup=1,
    bf16=False,
    gradient_checkpointing=False,
)


# ---------------------------------------------------------------------------------------------- loss


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def loss_inputs(n: int, hidden: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(torch.bfloat16)

    return {
        "hidden": randn(n, hidden).requires_grad_(True),
        "weight": randn(vocab, hidden, scale=hidden**-0.5).requires_grad_(True),
        "teacher_hidden": randn(n, hidden),
        "teacher_weight": randn(vocab, hidden, scale=2 * hidden**-0.5),
    }


def naive(x: dict[str, torch.Tensor], chunk: int | None) -> torch.Tensor:
    logits = x["hidden"] @ x["weight"].t()
    with torch.no_grad():
        teacher = x["teacher_hidden"] @ x["teacher_weight"].t()
    log_q, log_p = F.log_softmax(logits.float(), -1), F.log_softmax(teacher.float(), -1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def trl_gkd(x: dict[str, torch.Tensor], chunk: int | None) -> torch.Tensor:
    from trl.experimental.gkd import GKDTrainer

    logits = x["hidden"] @ x["weight"].t()
    with torch.no_grad():
        teacher = x["teacher_hidden"] @ x["teacher_weight"].t()
    return GKDTrainer.generalized_jsd_loss(logits, teacher, beta=0.0)


def trl_chunked(x: dict[str, torch.Tensor], chunk: int | None) -> torch.Tensor:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    mask = torch.ones(1, x["hidden"].shape[0], dtype=torch.long, device=x["hidden"].device)
    loss, _, _ = _chunked_divergence_loss(
        x["hidden"][None], x["teacher_hidden"][None], x["weight"], x["teacher_weight"], mask, beta=0.0
    )
    return loss


def liger(x: dict[str, torch.Tensor], chunk: int | None) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=0.0)(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])


def ours(x: dict[str, torch.Tensor], chunk: int | None) -> torch.Tensor:
    from hf_capgap.losses import FusedTeacher, LossSpec, distillation_loss

    labels = torch.zeros(x["hidden"].shape[0], dtype=torch.long, device=x["hidden"].device)
    teacher = FusedTeacher(x["teacher_hidden"], x["teacher_weight"])
    spec = LossSpec(kind="forward_kl", alpha=1.0, chunk_size=chunk)
    return distillation_loss(x["hidden"], teacher, labels, spec, lm_head_weight=x["weight"]).loss


LOSSES: dict[str, Callable[[dict[str, torch.Tensor], int | None], torch.Tensor]] = {
    "naive": naive,
    "trl-gkd": trl_gkd,
    "trl-chunked": trl_chunked,
    "liger": liger,
    "ours": ours,
}


def unavailable(variant: str, device: str) -> str | None:
    import importlib.util

    if variant == "liger" and (device != "cuda" or importlib.util.find_spec("liger_kernel") is None):
        return "liger-kernel not installed" if importlib.util.find_spec("liger_kernel") is None else "needs CUDA"
    return None


def time_loss(fn, x: dict[str, torch.Tensor], chunk: int | None, device: str, repeats: int = 3) -> dict:
    """Peak extra memory and median seconds of forward + backward (gradients for hidden and weight)."""
    times = []
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats + 1):
        x["hidden"].grad = x["weight"].grad = None
        synchronize(device)
        start = time.perf_counter()
        loss = fn(x, chunk)
        loss.backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return {"seconds": statistics.median(times[1:]), "peak_bytes": peak, "loss": float(loss.detach())}


def relative_errors(fn, x: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """Loss, hidden-gradient and weight-gradient error of ``fn`` (bf16) against fp32 on the first rows."""
    rows = {k: (v[:REFERENCE_ROWS] if k.endswith("hidden") else v).detach() for k, v in x.items()}
    low = {k: v.clone().requires_grad_(k in ("hidden", "weight")) for k, v in rows.items()}
    high = {k: v.float().requires_grad_(k in ("hidden", "weight")) for k, v in rows.items()}
    results = []
    for inputs in (low, high):
        loss = fn(inputs, None) if inputs is low else naive(inputs, None)
        grads = torch.autograd.grad(loss, (inputs["hidden"], inputs["weight"]))
        results.append((loss.detach().double(), *(g.double() for g in grads)))
    return tuple(float((a - b).norm() / b.norm()) for a, b in zip(*results, strict=True))


def loss_section(plan: Plan) -> list[str]:
    lines = [
        "| N | H | V | variant | chunk | time ms | time / naive | peak extra MiB | memory / naive | loss |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    errors = [
        "| N | H | V | variant | loss rel. err | d hidden rel. err | d weight rel. err |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    from hf_capgap.losses import LossSpec

    for n, hidden, vocab in plan.loss_shapes:
        x = loss_inputs(n, hidden, vocab, plan.device)
        automatic = LossSpec().rows_per_chunk(vocab, hidden, plan.device)
        runs = [(v, None) for v in LOSSES] + [("ours", c) for c in plan.chunk_sweep if c != automatic]
        base = None
        for variant, chunk in runs:
            shown = f"{automatic} (auto)" if variant == "ours" and chunk is None else (chunk or "-")
            reason = unavailable(variant, plan.device)
            if reason is not None:
                lines.append(f"| {n} | {hidden} | {vocab} | {variant} | - | skipped: {reason} | | | | |")
                continue
            try:
                result = time_loss(LOSSES[variant], x, chunk, plan.device)
            except Exception as error:  # a baseline that cannot run here is a row, not a crash
                lines.append(
                    f"| {n} | {hidden} | {vocab} | {variant} | {shown} | "
                    f"failed: {type(error).__name__}: {error} | | | | |"
                )
                continue
            base = base or result
            memory = "n/a" if result["peak_bytes"] is None else f"{result['peak_bytes'] / 2**20:.0f}"
            memory_ratio = (
                "n/a" if result["peak_bytes"] is None else f"{result['peak_bytes'] / base['peak_bytes']:.3f}x"
            )
            lines.append(
                f"| {n} | {hidden} | {vocab} | {variant} | {shown} | {result['seconds'] * 1e3:.1f}"
                f" | {result['seconds'] / base['seconds']:.2f}x | {memory} | {memory_ratio} | {result['loss']:.5f} |"
            )
        for variant in ("ours", "naive"):
            loss_err, hidden_err, weight_err = relative_errors(LOSSES[variant], x)
            errors.append(
                f"| {min(n, REFERENCE_ROWS)} | {hidden} | {vocab} | {variant} bf16 vs fp32 | "
                f"{loss_err:.2e} | {hidden_err:.2e} | {weight_err:.2e} |"
            )
        del x
    return lines + ["", *errors]


# ---------------------------------------------------------------------------------------------- trainer


def qwen2(plan: Plan, shape: Model, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=plan.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=plan.seq_len,
        tie_word_embeddings=True,
    )
    with torch.device(plan.device):
        return Qwen2ForCausalLM(config)


def word_tokenizer(vocab: int):
    """A tokenizer of exactly ``vocab`` tokens, so both trainers compare distributions over the whole vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = {"<pad>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(tokens, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def trainer_settings(plan: Plan) -> dict:
    """Set on both trainers, explicitly (GKDConfig's own defaults are bf16=True, gradient_checkpointing=True)."""
    return {
        "bf16": plan.bf16,
        "fp16": False,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "per_device_train_batch_size": plan.batch,
        "max_length": plan.seq_len,
    }


def run_trainer(plan: Plan, variant: str, distributed: str | None) -> dict:
    """Train ``variant`` (ours / gkd) for plan.steps steps in this process; tokens/s and peak memory."""
    import datasets
    from transformers import TrainerCallback

    from hf_capgap.data import make_collator

    student, teacher = qwen2(plan, plan.student, 0), qwen2(plan, plan.teacher, 1)
    if plan.bf16:
        teacher = teacher.to(torch.bfloat16)
    tokenizer = word_tokenizer(plan.vocab)
    ids = torch.randint(
        2, plan.vocab, (plan.steps * plan.batch, plan.seq_len), generator=torch.Generator().manual_seed(0)
    )
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    common = {
        **trainer_settings(plan),
        "max_steps": plan.steps,
        "learning_rate": 1e-5,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "logging_steps": plan.steps,
        "seed": 0,
        "use_cpu": plan.device == "cpu",
    }
    if distributed == "fsdp2":
        common.update(fsdp="full_shard", fsdp_config={"version": 2, "reshard_after_forward": True})
    elif distributed == "zero3":
        common["deepspeed"] = {
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
        }
    with tempfile.TemporaryDirectory() as output_dir:
        if variant == "gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(output_dir=output_dir, **common, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0)
            trainer_class, collator = GKDTrainer, make_collator(tokenizer)
        else:
            from hf_capgap import DistillationConfig, DistillationTrainer

            args = DistillationConfig(output_dir=output_dir, **common, loss="forward_kl", alpha=1.0, temperature=1.0)
            trainer_class, collator = DistillationTrainer, None
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=tokenizer,
        )
        clock: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                synchronize(plan.device)
                clock.append(time.perf_counter())

        trainer.add_callback(StepClock())
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
    seconds = clock[-1] - clock[plan.warmup - 1]
    return {
        "tokens_per_s": (len(clock) - plan.warmup) * plan.batch * plan.seq_len / seconds,
        "peak_bytes": torch.cuda.max_memory_allocated() if plan.device == "cuda" else None,
        "train_loss": result.training_loss,
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "settings": {key: getattr(args, key) for key in trainer_settings(plan)},
        "sharding": "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "none",
        "head": head_path(trainer) if variant == "ours" else "full logits (GKDTrainer)",
    }


def head_path(trainer) -> str:
    """The lm_head path the student trained on, in the words the trainer logs."""
    from hf_capgap.losses.lm_head import choose_lm_head, head_sharding

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    return choose_lm_head(model, trainer.args.fused_lm_head, head_sharding(trainer.accelerator)).reason


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def trainer_in_subprocess(smoke: bool, variant: str, distributed: str | None) -> dict:
    """One trainer run in a fresh process (clean peak memory; a one-process group for FSDP2 / ZeRO-3)."""
    command = [sys.executable, __file__, "--trainer-child", variant, *(["--smoke"] if smoke else [])]
    command += ["--distributed", distributed] if distributed else []
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    if distributed:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def trainer_section(plan: Plan, smoke: bool) -> list[str]:
    import importlib.util

    results = {variant: trainer_in_subprocess(smoke, variant, None) for variant in ("gkd", "ours")}
    lines = [
        "| trainer | tokens/s | speed vs gkd | peak GPU memory | memory vs gkd | train loss | lm_head path |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    base = results["gkd"]
    for variant, result in results.items():
        if "error" in result:
            lines.append(f"| {variant} | failed: {result['error']} | | | | | |")
            continue
        speed = f"{result['tokens_per_s'] / base['tokens_per_s']:.2f}x" if "error" not in base else "-"
        memory = (
            "n/a"
            if result["peak_bytes"] is None or "error" in base
            else f"{result['peak_bytes'] / base['peak_bytes']:.2f}x"
        )
        lines.append(
            f"| {variant} | {result['tokens_per_s']:.0f} | {speed} | {gib(result['peak_bytes'])} | {memory}"
            f" | {result['train_loss']:.4f} | {result['head']} |"
        )
    if "error" not in base:
        lines.insert(
            0, f"settings read back from both trainers: gkd {base['settings']}, ours {results['ours'].get('settings')}"
        )
        lines.insert(
            1,
            f"student {base['student_params'] / 1e6:.2f}M params, "
            f"teacher {base['teacher_params'] / 1e6:.2f}M params\n",
        )
    lines += [
        "",
        "| ours under | ran | sharding active | tokens/s | peak GPU memory | lm_head path |",
        "|---|---|---|---:|---:|---|",
    ]
    for distributed in ("fsdp2", "zero3"):
        if plan.device != "cuda":
            lines.append(f"| {distributed}, 1 process | skipped: needs CUDA | | | | |")
        elif distributed == "zero3" and importlib.util.find_spec("deepspeed") is None:
            lines.append(f"| {distributed}, 1 process | skipped: deepspeed not installed | | | | |")
        else:
            result = trainer_in_subprocess(smoke, "ours", distributed)
            if "error" in result:
                lines.append(f"| {distributed}, 1 process | failed: {result['error']} | | | | |")
            else:
                lines.append(
                    f"| {distributed}, 1 process | yes | {result['sharding']} | {result['tokens_per_s']:.0f}"
                    f" | {gib(result['peak_bytes'])} | {result['head']} |"
                )
    return lines


# ---------------------------------------------------------------------------------------------- cache


def cache_section(plan: Plan) -> list[str]:
    """Cache build vs a plain teacher forward over the same rows and batches: tokens/s and peak memory."""
    import datasets

    from hf_capgap import DistillationConfig, TeacherCache
    from hf_capgap.data import forward_inputs, make_collator
    from hf_capgap.utils.artifacts import model_fingerprint

    teacher = qwen2(plan, plan.teacher, 1).eval()
    if plan.bf16:
        teacher = teacher.to(torch.bfloat16)
    tokenizer = word_tokenizer(plan.vocab)
    rows = plan.steps * plan.batch
    ids = torch.randint(2, plan.vocab, (rows, plan.seq_len), generator=torch.Generator().manual_seed(0))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    args = DistillationConfig(output_dir="unused", report_to=[], max_length=plan.seq_len, use_cpu=plan.device == "cpu")
    collator = make_collator(tokenizer, args)
    tokens = rows * plan.seq_len

    def measured(fn: Callable[[], None]) -> tuple[float, int | None]:
        synchronize(plan.device)
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if plan.device == "cuda" else 0
        start = time.perf_counter()
        fn()
        synchronize(plan.device)
        seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated() - base if plan.device == "cuda" else None

    @torch.inference_mode()
    def forward() -> None:
        for low in range(0, rows, plan.batch):
            batch = collator([{"input_ids": row} for row in ids[low : low + plan.batch].tolist()])
            inputs = {k: v.to(plan.device) for k, v in forward_inputs(batch).items()}
            teacher(**inputs, use_cache=False)

    forward()  # warm-up
    plain_s, plain_peak = measured(forward)
    # Paid once per build whatever its size (every weight hashed on the host): shown apart.
    fingerprint_s, _ = measured(lambda: model_fingerprint(teacher))
    lines = [
        f"teacher cache build: {rows} rows x {plan.seq_len} tokens, batch {plan.batch}, teacher {plan.teacher}; "
        f"the build's one-time teacher fingerprint took {fingerprint_s:.1f} s",
        "| what | tokens/s | / plain forward | / plain forward, fingerprint excluded | peak memory |",
        "|---|---:|---:|---:|---:|",
        f"| plain teacher forward | {tokens / plain_s:.0f} | 1.00x | 1.00x | {gib(plain_peak)} |",
    ]
    for mode, k in (("sampled", 16), ("topk", 64)):
        with tempfile.TemporaryDirectory() as folder:

            def build(path: str = folder, mode: str = mode, k: int = k) -> None:
                TeacherCache.build(teacher, dataset, f"{path}/cache", tokenizer=tokenizer, args=args, mode=mode, k=k,
                                   batch_size=plan.batch, progress=False)  # fmt: skip

            seconds, peak = measured(build)
        lines.append(
            f"| build {mode} k={k} | {tokens / seconds:.0f} | {plain_s / seconds:.2f}x |"
            f" {plain_s / max(seconds - fingerprint_s, 1e-9):.2f}x | {gib(peak)} |"
        )
    # batch_size = every row: the build halves it on each out-of-memory error, down to what fits.
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as halvings:
        warnings.simplefilter("always")

        def build_largest(path: str = folder) -> None:
            TeacherCache.build(teacher, dataset, f"{path}/cache", tokenizer=tokenizer, args=args, mode="sampled", k=16,
                               batch_size=rows, progress=False)  # fmt: skip

        seconds, peak = measured(build_largest)
    reached = rows >> sum("ran out of memory" in str(warning.message) for warning in halvings)
    lines.append(
        f"| build sampled k=16, batch_size={rows} (ran at {reached}) | {tokens / seconds:.0f} |"
        f" {plain_s / seconds:.2f}x | {plain_s / max(seconds - fingerprint_s, 1e-9):.2f}x | {gib(peak)} |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, under a minute")
    parser.add_argument("--trainer-child", choices=("ours", "gkd"), help=argparse.SUPPRESS)
    parser.add_argument("--distributed", choices=("fsdp2", "zero3"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = SMOKE if args.smoke else GPU
    if args.trainer_child:
        print(json.dumps(run_trainer(plan, args.trainer_child, args.distributed)))
        return
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run with --smoke for the CPU check.")
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (smoke)"
    print(f"gpu_check on {device}, torch {torch.__version__}; plan: {json.dumps(asdict(plan))}\n")
    print("\n".join(loss_section(plan)))
    print()
    print("\n".join(trainer_section(plan, args.smoke)))
    print()
    print("\n".join(cache_section(plan)))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
