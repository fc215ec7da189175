"""Teacher forwards in batches that fit: halving a batch that runs out of memory, and the spare forwards
a rank owes the others when the teacher is sharded across ranks (each forward is then a collective)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hf_capgap.cache.encode import LabelledStates
from hf_capgap.cache.format import ShardPlan, row_dicts

T = TypeVar("T")


class FittingBatchSize:
    """Rows per teacher forward: the build's ``batch_size``, halved whenever a batch runs out of memory
    (accelerate's test for such errors), and kept at the size that fit for the rest of the build.

    So a ``batch_size`` too large for the device costs one failed batch, not the build, and a large one
    finds the largest batch that fits. The rows a shard holds and the seed of a row's draws (its index)
    do not depend on the batches, so a build that halved equals one run at the smaller size.
    """

    def __init__(self, rows: int, *, halve: bool = True) -> None:
        self.rows, self.halve = rows, halve

    def batches(self, start: int, end: int, work: Callable[[int, int], T]) -> Iterator[tuple[int, int, T]]:
        """(low, high, work(low, high)) over rows [start, end) in batches that fit."""
        low = start
        while low < end:
            high = min(low + self.rows, end)
            fitted, result = self._attempt(work, low, high)
            if fitted:
                yield low, high, result
                low = high

    def _attempt(self, work: Callable[[int, int], T], low: int, high: int) -> tuple[bool, T | None]:
        from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

        try:
            return True, work(low, high)
        except RuntimeError as err:
            if not self.halve or self.rows == 1 or not should_reduce_batch_size(err):
                raise
        # Past the except block the error, and the failed batch's tensors its traceback held, are gone.
        clear_device_cache(garbage_collection=True)
        self.rows = max(1, self.rows // 2)
        warnings.warn(
            f"teacher cache: a batch of {high - low} rows ran out of memory; continuing with batch_size={self.rows}.",
            stacklevel=4,
        )
        return False, None


def runs_in_lockstep(teacher: Any, num_processes: int) -> bool:
    """Whether every rank must run as many teacher forwards as the others, and none may retry one alone:
    a teacher sharded across ranks (FSDP, DeepSpeed ZeRO-3) runs each forward as a collective."""
    from hf_capgap.losses.lm_head import parameter_sharding

    return num_processes > 1 and parameter_sharding(teacher) is not None


def batch_count(plan: ShardPlan, shards: list[int], batch_size: int) -> int:
    """Teacher forwards that building ``shards`` takes in batches of ``batch_size`` rows."""
    return sum(-(-(plan.rows(j)[1] - plan.rows(j)[0]) // batch_size) for j in shards)


def join_other_ranks_forwards(
    teacher: Any, rows: Any, collator: Callable[[list[dict[str, Any]]], Any], forwards: int
) -> None:
    """Run the teacher ``forwards`` times on the first row: what this rank owes the busier ranks when
    the teacher is sharded (ranks build different shards, but each forward needs every rank)."""
    import torch

    if not forwards:
        return
    first = row_dicts(rows.with_format("arrow")[:1])
    with torch.inference_mode(), evaluating(teacher):
        for _ in range(forwards):
            LabelledStates.of(teacher, first, collator(first))


@contextlib.contextmanager
def evaluating(teacher: Any) -> Iterator[None]:
    """The teacher in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = teacher.training
    teacher.eval()
    try:
        yield
    finally:
        teacher.train(was_training)
