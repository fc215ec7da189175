"""One SGD step of DistillationTrainer; launched by tests under accelerate with 2 CPU processes.

Each rank saves the student's lm_head after the step and its rank/world size into OUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_capgap import DistillationConfig, DistillationTrainer

VOCAB = 64
LENGTHS = [5, 11, 8, 3, 12, 6, 9, 4]


def model(hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]})


def train(out: Path, per_device_batch: int) -> tuple[torch.Tensor, torch.Tensor, DistillationTrainer]:
    teacher, student = model(32, seed=1), model(16, seed=2)
    before = student.lm_head.weight.detach().clone()
    args = DistillationConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=per_device_batch, max_steps=1, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential",
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, alpha=0.5, temperature=2.0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset())
    trainer.train()
    return before, student.lm_head.weight.detach().clone(), trainer


class AlignmentCheckingTrainer(DistillationTrainer):
    """Counts batch rows whose cached teacher signal belongs to their own input ids."""

    def __init__(self, *args, expected: dict[tuple[int, ...], list], **kwargs):
        super().__init__(*args, **kwargs)
        self.expected, self.rows_seen, self.rows_aligned = expected, 0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for ids, topk in zip(inputs["input_ids"], inputs["teacher_topk_ids"], strict=True):
            self.rows_seen += 1
            self.rows_aligned += int(topk.tolist() == self.expected[tuple(ids.tolist())])
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train_from_cache(out: Path) -> dict[str, int]:
    """Build a cache with both ranks, then train two shuffled epochs on it."""
    from hf_capgap import TeacherCache

    packed = Dataset.from_dict({"input_ids": torch.randint(1, VOCAB, (12, 8), generator=torch.Generator().manual_seed(0)).tolist()})
    cache = TeacherCache.build(model(32, seed=1), packed, out / "cache", mode="topk", k=4, shard_tokens=16, progress=False)
    expected = {tuple(row["input_ids"]): row["topk_ids"] for row in cache.dataset}
    args = DistillationConfig(
        output_dir=str(out / "run-cache"), per_device_train_batch_size=2, num_train_epochs=2, report_to=[],
        save_strategy="no", disable_tqdm=True, use_cpu=True, teacher_cache=str(out / "cache"),
    )
    trainer = AlignmentCheckingTrainer(model=model(16, seed=2), args=args, train_dataset=packed, expected=expected)
    trainer.train()
    return {"rows_seen": trainer.rows_seen, "rows_aligned": trainer.rows_aligned, "shards": len(cache.manifest["shards"])}


def main(out: Path) -> None:
    before, after, trainer = train(out, per_device_batch=2)
    rank, world = trainer.args.process_index, trainer.args.world_size
    save_file({"delta": (after - before).contiguous()}, str(out / f"rank{rank}.safetensors"))
    report = {"rank": rank, "world_size": world, **train_from_cache(out)}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # Both ranks are done once this barrier passes. Exit without interpreter-exit destructors: gloo's
    # can abort a rank ("terminate called without an active exception"), and an explicit
    # destroy_process_group sometimes hangs; the results are already on disk.
    trainer.accelerator.wait_for_everyone()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
