"""What DistillationTrainer logs besides the loss: per-mode local sums between logs, summed over ranks when
logged, and under DDP the positions of the rows accelerate repeats to even out the last eval batch, which
count nothing (``gather_for_metrics`` drops them; the sums here must too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hf_capgap.data.sft import EXAMPLE_TOKENS_KEY, STUDENT_SAMPLED_KEY
from hf_capgap.errors import ConfigError
from hf_capgap.losses import DistillationLossOutput, LossSpec

# What each trainer mode accumulates between logs (local sums, reduced across ranks when logged).
PARTS = (
    "distill_sum", "distill_tokens", "ce_sum", "ce_tokens", "empty_micro_batches",
    "entropy_sum", "num_correct", "stat_tokens", "aux_sum", "aux_micro_batches",
    # On-policy training only (lmbda > 0 or seq_kd), added by :meth:`MetricSums.add`.
    "on_policy_micro_batches", "drawn_micro_batches", "completion_tokens", "completions",
    "generation_seconds", "step_seconds",
)  # fmt: skip

# Metric name, then the part summed and the part it is averaged over.
_MEANS = (
    ("distill_loss", "distill_sum", "distill_tokens"), ("ce_loss", "ce_sum", "ce_tokens"),
    ("entropy", "entropy_sum", "stat_tokens"), ("mean_token_accuracy", "num_correct", "stat_tokens"),
    ("aux_loss", "aux_sum", "aux_micro_batches"),
    ("on_policy_share", "on_policy_micro_batches", "drawn_micro_batches"),
    ("completion_length", "completion_tokens", "completions"),
    ("generation_time_share", "generation_seconds", "step_seconds"),
)  # fmt: skip


class ExampleTokensCollator:
    """An evaluation collator that records each example's token count in a padding-free batch
    (``EXAMPLE_TOKENS_KEY``): there the examples lie end to end in one row, and a packed example holds
    several documents, so ``position_ids`` cannot say where an example ends."""

    def __init__(self, collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        # Counted before collating (a collator may consume its examples); rows of another shape get nothing.
        tokenized = all(isinstance(example, Mapping) and "input_ids" in example for example in examples)
        tokens = [len(example["input_ids"]) for example in examples] if tokenized else None
        batch = self.collator(examples)
        if tokens is not None and "attention_mask" not in batch and "position_ids" in batch:
            batch[EXAMPLE_TOKENS_KEY] = torch.tensor(tokens)
        return batch


def repeated_positions(inputs: Mapping[str, Tensor], accelerator: Any) -> Tensor | None:
    """The flattened positions of the rows accelerate repeated to give every rank a full last eval batch,
    or None when there are none.

    ``gather_for_metrics`` keeps the first ``remainder`` rows of the last batch gathered rank after rank
    (each rank's batch as long: a dataset's own batches, or an IterableDataset's last batch as rank 0
    dispatched it); the metrics here are summed over ranks instead, so each rank drops its rows past that
    point. Rows are the batch's rows, or in a padding-free batch its examples (``EXAMPLE_TOKENS_KEY``).
    """
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return None
    ids = inputs["input_ids"]
    if EXAMPLE_TOKENS_KEY in inputs:
        tokens = inputs[EXAMPLE_TOKENS_KEY].to(ids.device)
        rows = tokens.numel()
        row = torch.repeat_interleave(torch.arange(rows, device=ids.device), tokens)
        row = F.pad(row, (0, ids.numel() - row.numel()), value=rows)  # a pad_to_multiple_of tail: no example's
    elif "attention_mask" not in inputs and "position_ids" in inputs:
        raise ConfigError(
            f"a padding-free eval batch without {EXAMPLE_TOKENS_KEY!r} under {accelerator.num_processes} processes: "
            "its rows cannot be told apart from the rows repeated to even out the last batch. Evaluate with the "
            "trainer's own eval dataloader."
        )
    else:
        rows = ids.shape[0]
        row = torch.arange(rows, device=ids.device)[:, None].expand_as(ids).flatten()
    real = min(max(state.remainder - accelerator.process_index * rows, 0), rows)
    return row >= real


def input_tokens(inputs: Mapping[str, Tensor]) -> Tensor:
    """A training micro-batch's input tokens as SFTTrainer counts them: non-padding tokens, or the packed
    row's length for padding-free batches."""
    ids = inputs["input_ids"]
    return inputs["attention_mask"].sum() if "attention_mask" in inputs else ids.new_tensor(ids.numel())


class MetricSums:
    """The local sums of ``PARTS`` per mode (train / eval) since that mode's last log, and the input tokens of
    the training micro-batches not yet in SFTTrainer's ``_total_train_tokens`` (int64: a float32 sum is
    inexact past 2**24), added, summed over ranks, at the next log of either mode."""

    def __init__(self) -> None:
        self._parts: dict[str, Tensor] = {}
        self._pending_train_tokens: Tensor | None = None

    def record(
        self,
        mode: str,
        output: DistillationLossOutput,
        spec: LossSpec,
        inputs: Mapping[str, Tensor],
        aux_loss: Tensor | None,
        repeated: Tensor | None = None,
    ) -> None:
        """Add one micro-batch; a part the loss skipped counts 0 tokens. Every training micro-batch adds its
        input tokens. Positions in ``repeated`` rows count nothing; a batch of only those is not counted."""
        if repeated is not None and bool(repeated.all()):
            return
        if mode == "train":
            tokens = input_tokens(inputs)
            pending = self._pending_train_tokens
            self._pending_train_tokens = tokens.long() if pending is None else pending + tokens
        tokens = float(output.num_tokens)
        # On the student's own samples, accuracy only says how often a sample was the argmax (it moves with
        # sampling_temperature): entropy and accuracy are read on dataset and teacher-sampled rows only.
        stats = output.entropy_sum is not None and STUDENT_SAMPLED_KEY not in inputs
        values = {
            "distill_sum": output.distill_sum, "distill_tokens": tokens if spec.alpha > 0 else 0.0,
            "ce_sum": output.ce_sum, "ce_tokens": tokens if spec.alpha < 1 else 0.0,
            "empty_micro_batches": float(output.num_tokens == 0),
            "entropy_sum": output.entropy_sum if stats else 0.0, "num_correct": output.num_correct if stats else 0.0,
            "stat_tokens": tokens if stats else 0.0,
            "aux_sum": aux_loss.detach().float() if aux_loss is not None else 0.0,
            "aux_micro_batches": float(aux_loss is not None),
        }  # fmt: skip
        device = output.loss.device
        step = torch.stack(
            [torch.as_tensor(values.get(name, 0.0), dtype=torch.float32, device=device) for name in PARTS]
        )
        self._parts[mode] = self._parts[mode].to(device) + step if mode in self._parts else step

    def add(self, mode: str, **values: float) -> None:
        """Add ``values`` to the named parts of ``mode`` (the on-policy counts and times)."""
        step = torch.tensor([float(values.pop(name, 0.0)) for name in PARTS])
        if values:
            raise KeyError(f"unknown metric parts: {sorted(values)}")
        if mode in self._parts:
            self._parts[mode] = self._parts[mode] + step.to(self._parts[mode].device)
        else:
            self._parts[mode] = step

    def discard(self, mode: str) -> None:
        """Forget ``mode``'s sums (an evaluation loop starts from none)."""
        self._parts.pop(mode, None)

    def reduce(self, mode: str, accelerator: Any, device: torch.device) -> tuple[dict[str, float], int]:
        """``mode``'s token-weighted means since its last log and its empty micro-batches, summed over ranks,
        and the pending training input tokens summed over ranks; both start again from zero. A collective:
        every rank calls it."""
        parts = self._parts.pop(mode, None)
        if parts is None:
            parts = torch.zeros(len(PARTS))
        pending = self._pending_train_tokens
        self._pending_train_tokens = None
        pending = torch.zeros((), dtype=torch.long) if pending is None else pending
        reduced = accelerator.reduce({"parts": parts.to(device), "tokens": pending.to(device)}, "sum")
        total = dict(zip(PARTS, reduced["parts"].tolist(), strict=True))
        metrics: dict[str, float] = {
            name: round(total[numerator] / total[tokens], 6) for name, numerator, tokens in _MEANS if total[tokens] > 0
        }
        metrics["empty_micro_batches"] = int(total["empty_micro_batches"])
        return metrics, int(reduced["tokens"])
