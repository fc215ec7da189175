"""The student's and teacher's output layer, taken out of the model so the loss can fuse it.

The memory-lean loss multiplies last hidden states by the lm_head weight chunk by chunk, so the
[tokens, vocab] logits never exist in full. For that the model must return its last hidden states:
:func:`lm_head_bypassed` swaps the head for a pass-through during one forward call, and
:func:`fusable_head` says whether a model's head can be fused at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


# Architectures whose logits are exactly lm_head(last_hidden_state): no soft-capping or scaling after.
FUSABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2", "phi3", "olmo2"})


class _ThroughHead(torch.autograd.Function):
    """Identity on hidden states that lists the lm_head parameters as inputs.

    Their gradient comes from the fused loss, but DDP's unused-parameter search walks the graph from
    the forward outputs: without this edge it would mark the lm_head unused, then see its gradient
    arrive and fail with "marked ready twice".
    """

    @staticmethod
    def forward(ctx, hidden_states: Tensor, *head_parameters: Tensor) -> Tensor:  # type: ignore[override]
        ctx.num_parameters = len(head_parameters)
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (grad, *([None] * ctx.num_parameters))


class _PassThrough(nn.Module):
    """Stands in for the lm_head so the model returns its last hidden states as ``logits``."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head_parameters = [p for p in (head.weight, head.bias) if p is not None]

    def forward(self, hidden_states: Tensor) -> Tensor:
        return _ThroughHead.apply(hidden_states, *self.head_parameters)


def base_model(model: nn.Module) -> nn.Module:
    """The causal LM inside PEFT wrappers."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def lm_head_bypassed(model: nn.Module, head: nn.Module) -> Iterator[None]:
    parent_name = next(name for name, child in model.named_children() if child is head)
    setattr(model, parent_name, _PassThrough(head))
    try:
        yield
    finally:
        setattr(model, parent_name, head)


def fusable_head(model: nn.Module, mode: str, sharded: bool) -> nn.Linear | None:
    """The lm_head to fuse into the loss, or None when the logits must be taken from the model."""
    if mode == "never":
        return None
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    reason = None
    if sharded:
        reason = "the weights are sharded (FSDP / DeepSpeed ZeRO-3)"
    elif type(head) is not nn.Linear:
        reason = f"its output layer is a {type(head).__name__}, not a plain nn.Linear"
    elif getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        reason = f"model_type {getattr(config, 'model_type', None)!r} may post-process its logits"
    elif head not in base.children():
        reason = "its lm_head is not a direct child module"
    if reason is None:
        return head
    if mode == "always":
        raise ValueError(f"fused_lm_head='always' but {reason}; use fused_lm_head='auto' or 'never'.")
    return None


