"""TAID's schedule of the interpolation weight t (Shing et al., ICLR 2025, arXiv 2501.16937, Algorithm 1).

After each optimizer step n, with J_n the step's TAID objective (token-weighted mean of T^2 KL(p_t || q)):

    delta = (J_{n-1} - J_n) / (J_{n-1} + 1e-15)            relative change of the objective
    m     = beta * m + (1 - beta) * delta                  its momentum
    t     = min(t_end, max(linear(n), t + alpha * sigmoid(m) * (1 - t)))

where linear(n) ramps from t_start to t_end over the run (progress = optimizer steps before step n / max_steps,
as the authors' code reads its global step). The first step only records J. t moves fast while the student
learns quickly and never falls behind the linear ramp. The state lives in ``trainer_state.json`` (an
``ExportableState`` callback), so a resumed run continues the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

RELATIVE_CHANGE_EPS = 1e-15  # the authors' guard against a zero previous objective


def next_t(
    t: float, momentum: float, previous: float, objective: float, progress: float, settings: Any
) -> tuple[float, float]:
    """(t, momentum) after a step whose objective is ``objective``; ``settings`` holds the taid_* fields."""
    relative_change = (previous - objective) / (previous + RELATIVE_CHANGE_EPS)
    momentum = settings.taid_beta * momentum + (1.0 - settings.taid_beta) * relative_change
    sigmoid = 0.5 * (1.0 + math.tanh(0.5 * momentum))  # = 1 / (1 + e^-m), without overflow for |m| > 709
    step = settings.taid_alpha * sigmoid * (1.0 - t)
    linear = settings.taid_t_start + (settings.taid_t_end - settings.taid_t_start) * progress
    return min(settings.taid_t_end, max(linear, t + step)), momentum


class TaidSchedule(TrainerCallback, ExportableState):
    """t, its momentum and the last step's objective, advanced once per optimizer step.

    The trainer adds each training micro-batch's distillation sum and token count (:meth:`record`); at
    the step's end they are summed over ranks, so every rank moves t identically, and equal to one
    process over the same batch. Restored from ``trainer_state.json`` when training starts from a checkpoint.
    """

    def __init__(self) -> None:
        self.t: float | None = None  # None until training starts: then taid_t_start, or the checkpoint's
        self.momentum = 0.0
        self.previous_objective: float | None = None
        self._step_sums: Tensor | None = None  # this rank's [distill sum, tokens] since the last optimizer step

    def state(self) -> dict[str, Any]:
        attributes = {"t": self.t, "momentum": self.momentum, "previous_objective": self.previous_objective}
        return {"args": {}, "attributes": attributes}

    def current_t(self, args: Any) -> float:
        """t for the next training loss (taid_t_start before training)."""
        return args.taid_t_start if self.t is None else self.t

    def record(self, distill_sum: Tensor, num_tokens: int) -> None:
        """Add one training micro-batch's sum of T^2 KL(p_t || q) over its ``num_tokens`` labelled tokens."""
        sums = torch.stack([distill_sum.detach().float(), distill_sum.new_tensor(float(num_tokens))])
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A run resumed from a checkpoint (global_step > 0) continues the schedule trainer_state.json holds;
        # any other run starts it afresh, also a second train() whose state still holds the first run's.
        recorded = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        attributes = recorded.get("attributes", {}) if isinstance(recorded, dict) else {}
        self.t, self.momentum, self.previous_objective = args.taid_t_start, 0.0, None
        if attributes.get("t") is not None:
            for name, value in attributes.items():
                setattr(self, name, value)
        self._step_sums = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sums = self._step_sums if self._step_sums is not None else torch.zeros(2, device=args.device)
        self._step_sums = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.to(args.device)
            dist.all_reduce(sums)  # every rank calls on_step_end: the objective of the whole batch
        total, tokens = sums.tolist()
        if tokens == 0:
            return  # no labelled token in the whole step: nothing measured, t stays
        objective = total / tokens
        if self.previous_objective is not None:
            progress = (state.global_step - 1) / max(state.max_steps, 1)
            self.t, self.momentum = next_t(self.t, self.momentum, self.previous_objective, objective, progress, args)
        self.previous_objective = objective
