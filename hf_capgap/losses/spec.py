"""LossSpec: what :func:`hf_capgap.losses.distillation_loss` computes, and in chunks of how many rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_capgap.errors import ConfigError
from hf_capgap.losses.divergence import LOSSES, check_beta

CHUNK_ELEMENTS = 1 << 22  # CPU: logits per automatic chunk, 16 MiB in fp32 (128 rows at a 32000 vocabulary)
ACCELERATOR_CHUNK_ROWS = (256, 2048)  # accelerators: H / 4 rows per automatic chunk, within these bounds


@dataclass(frozen=True)
class LossSpec:
    """What :func:`distillation_loss` computes: alpha * T^2 * D(teacher, student) + (1 - alpha) * CE.

    ``taid_t`` is TAID's interpolation weight for this call (``kind="taid"``): the trainer's schedule moves
    it, so it is set per step with ``dataclasses.replace`` and checked when the loss runs.
    """

    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.5
    chunk_size: int | None = None  # rows per chunk; None: automatic, by vocabulary, hidden size and device
    vocab_size: int | None = None  # real vocabulary: columns past it (padding) are ignored
    taid_t: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ConfigError(f"kind={self.kind!r} is not one of {', '.join(LOSSES)}.")
        check_beta(self.kind, self.beta)
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1 (or None for automatic), got {self.chunk_size}.")

    def rows_per_chunk(self, vocab: int, hidden: int | None = None, device: torch.device | str | None = None) -> int:
        """Rows per chunk: the explicit ``chunk_size``, else :meth:`automatic_rows`."""
        if self.chunk_size is not None:
            return self.chunk_size
        return self.automatic_rows(vocab, hidden, device)

    @staticmethod
    def automatic_rows(vocab: int, hidden: int | None = None, device: torch.device | str | None = None) -> int:
        """Rows per chunk for a [vocab, hidden] lm_head (``hidden`` None: logits input) on ``device``.

        CPU: the power of two that keeps one [rows, vocab] fp32 buffer near CHUNK_ELEMENTS; the loss
        holds about three such buffers, whatever the vocabulary (measured, bench/results/losses.md).
        Accelerators: each fused chunk re-reads the [V, H] weight and read-modify-writes its
        gradient (about 3 V H elements moved) for 6 rows V H flops, so at least 256 rows keep the
        matmuls above a current GPU's flop-per-byte ridge, and H / 4 rows keep the chunk's fp32
        [rows, V] buffers within one [V, H] fp32 gradient. Derived, not yet measured on a GPU:
        bench/gpu_check.py sweeps it.
        """
        if device is None or torch.device(device).type == "cpu":
            return 1 << max(4, (CHUNK_ELEMENTS // vocab).bit_length() - 1)
        low, high = ACCELERATOR_CHUNK_ROWS
        return 1 << (min(max((hidden or 0) // 4, low), high).bit_length() - 1)
