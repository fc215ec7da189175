"""The process layout every hf_capgap stage shares, set up the way ``accelerate launch`` meant it.

accelerate's process state is a singleton fixed by its first creation, and on a machine without a
GPU it only joins the launched processes into one gloo group when told to use the CPU; created
plainly, each of two launched CPU processes silently trains alone on all the data. Every stage
therefore asks this module (and every ``TrainingArguments`` passes :func:`use_cpu`).
"""

from __future__ import annotations

import os
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
