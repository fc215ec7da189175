"""On-policy DistillationTrainer on 2 gloo CPU processes; launched by tests/trainer/test_on_policy_distributed.py.

Two runs: lmbda=1 (every micro-batch sampled from the student), and lmbda=0.5 over 3 steps of 2 accumulated
micro-batches, where each rank records its own on/off draws: they must agree across ranks. Each rank writes
its draws, its generate calls and its training logs to OUT/on_policy{rank}.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from datasets import Dataset

from hf_capgap import DistillationConfig, DistillationTrainer
from hf_capgap.trainer import on_policy
from tests.conftest import CHAT_ROWS, chat_tokenizer, tiny_qwen2

DRAWS: list[tuple[int, int, bool]] = []
_draw = on_policy.draw_on_policy


def recorded_draw(seed: int, step: int, micro_step: int, lmbda: float) -> bool:
    drawn = _draw(seed, step, micro_step, lmbda)
    DRAWS.append((step, micro_step, drawn))
    return drawn


def train(out: Path, name: str, **settings) -> dict:
    teacher, student = tiny_qwen2(1024, hidden=32, seed=1), tiny_qwen2(1008, hidden=16, seed=2)
    calls = []
    generate = student.generate
    student.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    args = DistillationConfig(
        output_dir=str(out / name),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=1,
        max_completion_length=4,
        train_sampling_strategy="sequential",
        **settings,
    )
    rows = [{"prompt": messages[:-1], "completion": messages[-1:]} for messages in CHAT_ROWS]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=chat_tokenizer(),
    )
    DRAWS.clear()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    report = {"draws": list(DRAWS), "generate_calls": len(calls), "logs": logs}
    report["rank"], report["world_size"] = trainer.args.process_index, trainer.args.world_size
    trainer.accelerator.wait_for_everyone()
    return report


def main(out: Path) -> None:
    on_policy.draw_on_policy = recorded_draw
    full = train(out, "full", lmbda=1.0, max_steps=1, per_device_train_batch_size=2)
    mixed = train(out, "mixed", lmbda=0.5, max_steps=3, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    (out / f"on_policy{full['rank']}.json").write_text(json.dumps({"full": full, "mixed": mixed}))
    # Exit without interpreter-exit destructors (gloo's can abort a rank; see ddp_train_script.py).
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
