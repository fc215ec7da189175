"""``bytes_per_token``: the most draws of a sampled cache whose signal fits a byte budget per position,
measured by drawing and encoding the first rows as the build will."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hf_capgap.cache.batching import FittingBatchSize, evaluating
from hf_capgap.cache.encode import LabelledStates, encode_states
from hf_capgap.cache.format import MAX_DRAWS, SAMPLED_POSITION_BYTES, row_dicts, shard_schema, signal_bytes
from hf_capgap.data import rows_holding_positions
from hf_capgap.errors import ConfigError
from hf_capgap.utils.processes import ProcessGroup

BUDGET_POSITIONS = 4096
"""Labelled positions a ``bytes_per_token`` budget is measured on: the first rows that hold them,
whatever the batch size, so a rerun with another batch_size picks the same draws."""


def check_budget(bytes_per_token: float | None, mode: str) -> None:
    """Refuse a budget for a cache whose size is fixed, or one smaller than a single draw."""
    if bytes_per_token is not None and (mode != "sampled" or not bytes_per_token >= SAMPLED_POSITION_BYTES + 1):
        raise ConfigError(
            f"bytes_per_token={bytes_per_token!r} needs mode='sampled' and at least {SAMPLED_POSITION_BYTES + 1} "
            "bytes (one draw); top-k and dense caches have fixed sizes (4k + 4 and 2 x vocabulary bytes)."
        )


def draws_agreed_over_ranks(
    teacher: Any,
    rows: Any,
    collator: Callable[[list[dict[str, Any]]], Any],
    spec: dict[str, Any],
    budget: float,
    fitting: FittingBatchSize,
    group: ProcessGroup,
) -> int:
    """The draws every rank builds with: measured on the first rows holding :data:`BUDGET_POSITIONS`.

    Every rank measures the same rows, but one that halved its batches may round the bytes
    differently: all build with the fewest draws any rank measured, which fits the budget on each.
    """
    first = row_dicts(rows.with_format("arrow")[: rows_holding_positions(rows, BUDGET_POSITIONS)])
    draws = draws_for_budget(teacher, first, collator, spec, budget, fitting)
    return group.fewest_over_ranks(draws, next(teacher.parameters()).device)


def draws_for_budget(
    teacher: Any,
    rows: list[dict[str, Any]],
    collator: Callable[[list[dict[str, Any]]], Any],
    spec: dict[str, Any],
    budget: float,
    fitting: FittingBatchSize,
) -> int:
    """The most draws (<= MAX_DRAWS) whose sampled signal of ``rows`` (the first of the dataset, so a
    rerun picks the same number; run in batches that fit) fits ``budget`` bytes per position as stored
    (:func:`signal_bytes`, as the manifest counts them: list offsets included, 24 bytes a row).

    The bytes follow the distinct ids drawn and the gaps between them, which depend on how peaked the
    teacher is, so each candidate is drawn and encoded as the build will, from one teacher forward.
    """
    import torch

    def forward(low: int, high: int) -> LabelledStates:
        return LabelledStates.of(teacher, rows[low:high], collator(rows[low:high]))

    with torch.inference_mode(), evaluating(teacher):
        parts = list(fitting.batches(0, len(rows), forward))
        positions = sum(sum(states.positions) for _, _, states in parts)
        if not positions:
            raise ConfigError(
                f"bytes_per_token: the first {len(rows)} rows, where the draws are measured, have no labelled "
                "position once collated; give k= (the draws) instead."
            )

        def measured_bytes(draws: int) -> float:
            candidate = {**spec, "k": draws, "draws": draws}
            schema = shard_schema(candidate)
            stored = [encode_states(states, rows[low:high], low, candidate, schema) for low, high, states in parts]
            return sum(signal_bytes(record, "sampled") for record in stored) / positions

        low, high = 1, MAX_DRAWS  # bytes grow with the draws: bisect for the last that fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if measured_bytes(middle) <= budget else (low, middle - 1)
        if low == 1 and (one_draw := measured_bytes(1)) > budget:
            raise ConfigError(
                f"bytes_per_token={budget}: one draw already takes {one_draw:.2f} bytes per labelled position as "
                "stored here (with the list offsets of rows this short, 24 bytes a row); give at least that, or k=1."
            )
    return low
