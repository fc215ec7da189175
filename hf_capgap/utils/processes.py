"""The process layout every hf_capgap stage shares, set up the way ``accelerate launch`` meant it.

accelerate's process state is a singleton fixed by its first creation, and on a machine without a
GPU it only joins the launched processes into one gloo group when told to use the CPU; created
plainly, each of two launched CPU processes silently trains alone on all the data. Every stage
therefore asks this module (and every ``TrainingArguments`` passes :func:`use_cpu`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def use_cpu() -> bool:
    """Train on the CPU: no GPU here, or the launcher (``use_cpu: true``) asked for it."""
    import torch

    requested = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return requested or not torch.cuda.is_available()


def process_state() -> Any:
    """accelerate's ``PartialState``, created for the CPU when :func:`use_cpu` says so."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def end_processes() -> None:
    """Leave the process group explicitly once every process is done.

    Left to interpreter exit, gloo's destructors can abort a finished process ("terminate called
    without an active exception"), failing a launch whose work all succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launched_processes() -> int:
    """How many processes this launch started, read from the launcher's environment.

    Unlike :func:`process_state` this creates no process group, so a stage can refuse a launch
    before anything joins (or waits in) a collective.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the build's processes (one, or the ranks of a distributed launch)."""

    process_index: int
    num_processes: int
    wait_for_everyone: Callable[[], None]

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @classmethod
    def current(cls) -> ProcessGroup:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dist.barrier)
        state = process_state()
        return cls(state.process_index, state.num_processes, state.wait_for_everyone)

    def most_over_ranks(self, value: int, device: Any) -> int:
        """The largest ``value`` any rank holds (``device``: where the backend reduces, e.g. cuda for nccl)."""
        return self._reduce(value, device, "MAX")

    def fewest_over_ranks(self, value: int, device: Any) -> int:
        """The smallest ``value`` any rank holds."""
        return self._reduce(value, device, "MIN")

    def _reduce(self, value: int, device: Any, op: str) -> int:
        import torch
        import torch.distributed as dist

        if self.num_processes == 1:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(total, op=getattr(dist.ReduceOp, op))
        return int(total.item())
