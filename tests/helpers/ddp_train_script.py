"""One SGD step of DistillationTrainer; launched by tests under accelerate with 2 CPU processes.

The pair is Qwen2-like (GQA, tied and padded embeddings). With two ranks of two rows each, rank 1's
micro-batch has no labelled token (as assistant-only loss often makes): it must still step, with zero
gradients, and the result must equal one process over all four rows. Each rank saves the student's
embedding change and its rank/world size into OUT. ``taid``: four steps of loss='taid', whose schedule of t
must move alike on both ranks and as one process over the same batches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import save_file

from hf_capgap import DistillationConfig, DistillationTrainer
from hf_capgap.data import forward_inputs, next_token_labels
from tests.conftest import chat_tokenizer, tiny_qwen2

VOCAB = 1000  # the tokenizer's real vocabulary; both models pad their embeddings past it
LENGTHS = [5, 11, 8, 3, 12, 6, 9, 4]
MASKED_ROWS = (2, 3)  # rank 1's first micro-batch under 2 processes x 2 rows


def dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, VOCAB - 10, (n,), generator=generator).tolist() for n in LENGTHS]
    labels = [[-100] * len(row) if i in MASKED_ROWS else row for i, row in enumerate(rows)]
    return Dataset.from_dict({"input_ids": rows, "labels": labels})


def train(
    out: Path, per_device_batch: int, max_steps: int = 1, learning_rate: float = 1.0, **settings: Any
) -> tuple[torch.Tensor, torch.Tensor, DistillationTrainer]:
    teacher, student = tiny_qwen2(1024, hidden=32, seed=1), tiny_qwen2(1008, hidden=16, seed=2)
    before = student.lm_head.weight.detach().clone()
    args = DistillationConfig(
        output_dir=str(out / "run"),
        per_device_train_batch_size=per_device_batch,
        max_steps=max_steps,
        optim="sgd",
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        alpha=0.5,
        temperature=2.0,
        max_length=None,
        logging_steps=1,
        **settings,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset(), processing_class=chat_tokenizer()
    )
    trainer.train()
    return before, student.lm_head.weight.detach().clone(), trainer


class AlignmentCheckingTrainer(DistillationTrainer):
    """Counts labelled positions whose cached top-k ids are the online teacher's top-k for that position."""

    def __init__(self, *args, reference_teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_teacher, self.positions_seen, self.positions_aligned = reference_teacher, 0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cached = self.teacher_cache.teacher_signal(inputs)
        with torch.no_grad():
            logits = self.reference_teacher(**forward_inputs(inputs), use_cache=False).logits[..., :VOCAB]
        labelled = next_token_labels(inputs["labels"]) != -100
        online = logits.reshape(-1, VOCAB)[labelled].topk(cached.ids.shape[-1]).indices
        for cached_ids, online_ids in zip(cached.ids, online, strict=True):
            self.positions_seen += 1
            self.positions_aligned += int(set(cached_ids.tolist()) == set(online_ids.tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train_from_cache(out: Path) -> dict[str, int]:
    """Build a cache with both ranks, then train two shuffled epochs on it."""
    from hf_capgap import TeacherCache

    tokenizer, teacher = chat_tokenizer(), tiny_qwen2(1024, hidden=32, seed=1)
    rows = Dataset.from_dict(
        {"input_ids": torch.randint(10, VOCAB - 10, (12, 8), generator=torch.Generator().manual_seed(0)).tolist()}
    )
    args = DistillationConfig(
        output_dir=str(out / "run-cache"),
        per_device_train_batch_size=2,
        num_train_epochs=2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        teacher_cache=str(out / "cache"),
    )
    cache = TeacherCache.build(
        teacher, rows, out / "cache", tokenizer=tokenizer, args=args, mode="topk", k=4, shard_tokens=16, progress=False
    )
    trainer = AlignmentCheckingTrainer(
        model=tiny_qwen2(1008, hidden=16, seed=2),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        reference_teacher=teacher,
    )
    trainer.train()
    return {
        "positions_seen": trainer.positions_seen,
        "positions_aligned": trainer.positions_aligned,
        "shards": len(cache.manifest["shards"]),
    }


EVAL_METRICS = ("eval_ce_loss", "eval_distill_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_loss")
# Eval sets whose last batch accelerate evens out across 2 ranks of 2 rows: 5 rows (rank 0's last batch repeats
# 1 row, rank 1's is only repeated rows); 6 equal rows streamed (an IterableDataset: rank 0 reads and dispatches,
# the last batch is 1 row per rank); 10 rows packed into rows of 16 tokens (padding-free batches of documents).
EVAL_CASES = {
    "padded": {"lengths": [7, 12, 4, 9, 10]},
    "iterable": {"lengths": [8] * 6, "iterable": True},
    "packed": {"lengths": [5, 11, 8, 3, 12, 6, 9, 7, 10, 4], "packing": True, "max_length": 16, "eval_packing": True},
}


def evaluate_uneven(out: Path, case: str = "padded") -> tuple[dict[str, float], DistillationTrainer]:
    """Evaluate on the rows of EVAL_CASES[case] in batches of 2: under 2 ranks, the rows accelerate repeats to
    even the ranks out must not count in the metrics."""
    settings = dict(EVAL_CASES[case])
    lengths, iterable = settings.pop("lengths"), settings.pop("iterable", False)
    teacher, student = tiny_qwen2(1024, hidden=32, seed=1), tiny_qwen2(1008, hidden=16, seed=2)
    generator = torch.Generator().manual_seed(1)
    rows = Dataset.from_dict({"input_ids": [torch.randint(10, VOCAB - 10, (n,), generator=generator).tolist()
                                            for n in lengths]})  # fmt: skip
    args = DistillationConfig(
        output_dir=str(out / "run-eval"),
        per_device_eval_batch_size=2,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        alpha=0.5,
        temperature=2.0,
        **settings,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset(),
        eval_dataset=rows.to_iterable_dataset() if iterable else rows,
        processing_class=chat_tokenizer(),
    )
    metrics = trainer.evaluate()
    return {name: metrics[name] for name in EVAL_METRICS}, trainer


def main(out: Path) -> None:
    before, after, trainer = train(out, per_device_batch=2)
    rank, world = trainer.args.process_index, trainer.args.world_size
    save_file({"delta": (after - before).contiguous()}, str(out / f"rank{rank}.safetensors"))
    empty = next(entry["empty_micro_batches"] for entry in trainer.state.log_history if "empty_micro_batches" in entry)
    report = {"rank": rank, "world_size": world, "empty_micro_batches": empty, **train_from_cache(out)}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # Both ranks are done once this barrier passes. Exit without interpreter-exit destructors: gloo's
    # can abort a rank ("terminate called without an active exception"), and an explicit
    # destroy_process_group sometimes hangs; the results are already on disk.
    trainer.accelerator.wait_for_everyone()
    os._exit(0)


# 2 ranks x 1 row x 2 accumulated micro-batches == 1 process x 2 rows x 2: the same 4 rows per optimizer step.
TAID_SETTINGS = {
    "loss": "taid", "max_steps": 4, "gradient_accumulation_steps": 2, "learning_rate": 0.1,
    "taid_t_start": 0.4, "taid_alpha": 0.8, "taid_beta": 0.5,
}  # fmt: skip


def taid_t_logged(trainer: DistillationTrainer) -> list[float]:
    return [entry["taid_t"] for entry in trainer.state.log_history if "taid_t" in entry]


def main_taid(out: Path) -> None:
    before, after, trainer = train(out, per_device_batch=1, **TAID_SETTINGS)
    rank = trainer.args.process_index
    save_file({"delta": (after - before).contiguous()}, str(out / f"taid{rank}.safetensors"))
    report = {"world_size": trainer.args.world_size, "taid_t": taid_t_logged(trainer), "t": trainer.taid_schedule.t}
    (out / f"taid{rank}.json").write_text(json.dumps(report))
    trainer.accelerator.wait_for_everyone()
    os._exit(0)


def main_eval(out: Path, case: str) -> None:
    metrics, trainer = evaluate_uneven(out, case)
    (out / f"eval{trainer.args.process_index}.json").write_text(json.dumps(metrics))
    trainer.accelerator.wait_for_everyone()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[2:3] == ["eval"]:
        main_eval(Path(sys.argv[1]), sys.argv[3])
    elif sys.argv[2:3] == ["taid"]:
        main_taid(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
