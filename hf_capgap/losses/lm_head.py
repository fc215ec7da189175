"""The student's and teacher's output layer, taken out of the model so the loss can fuse it.

The memory-lean loss multiplies last hidden states by the lm_head weight chunk by chunk, so the
[tokens, vocab] logits never exist in full. For that the model must return its last hidden states:
:func:`lm_head_bypassed` swaps the head for a pass-through during one forward call, and
:func:`choose_lm_head` says whether a model's head can be fused, and why (or why not), in one line
that the trainer logs when training starts.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hf_capgap.errors import ConfigError

# Architectures whose logits are exactly lm_head(last_hidden_state): no soft-capping or scaling after.
FUSABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2", "phi3", "olmo2"})
FUSED_LM_HEAD_MODES = ("auto", "always", "never")


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


# One pass-through per head for the head's lifetime: a torch.compile'd model guards on its modules,
# and a new stand-in at every step would recompile it every step.
_PASS_THROUGHS: weakref.WeakKeyDictionary[nn.Linear, _PassThrough] = weakref.WeakKeyDictionary()


def base_model(model: nn.Module) -> nn.Module:
    """The causal LM inside torch.compile (``_orig_mod``) and PEFT wrappers."""
    while "_orig_mod" in model._modules:  # torch.compile's wrapper, found without importing torch._dynamo
        model = model._orig_mod
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def lm_head_bypassed(model: nn.Module, head: nn.Linear) -> Iterator[None]:
    """During the block, ``model`` (or the causal LM inside its wrappers) returns hidden states as logits."""
    model = base_model(model)
    parent_name = next(name for name, child in model.named_children() if child is head)
    if head not in _PASS_THROUGHS:
        _PASS_THROUGHS[head] = _PassThrough(head)
    setattr(model, parent_name, _PASS_THROUGHS[head])
    try:
        yield
    finally:
        setattr(model, parent_name, head)


@dataclass(frozen=True)
class HeadChoice:
    """The lm_head to fuse into the loss (None: the model returns full logits) and, in words, why."""

    head: nn.Linear | None
    reason: str


def head_sharding(accelerator: Any) -> str | None:
    """Why each rank holds only a shard of the lm_head under ``accelerator``, or None when it holds it whole.

    FSDP (1 and 2) and DeepSpeed ZeRO-3 shard parameters; ZeRO-0/1/2 shard optimizer state and
    gradients only, so the fused loss reads a whole weight there.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP shards the lm_head weight across ranks"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            return "DeepSpeed ZeRO-3 shards the lm_head weight across ranks"
    return None


def parameter_sharding(model: nn.Module) -> str | None:
    """Why ``model``'s weights are sharded across ranks, read from the weights themselves, or None.

    For a model used outside the accelerator that trains (a teacher given to a cache build): FSDP1
    wraps modules, FSDP2 and tensor parallelism make weights DTensors, DeepSpeed ZeRO-3 marks
    partitioned weights with ``ds_id``. Each forward of such a model is a collective.
    """
    from torch.distributed.tensor import DTensor

    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        return "FSDP shards its weights across ranks"
    for parameter in model.parameters():
        if hasattr(parameter, "ds_id"):
            return "DeepSpeed ZeRO-3 partitions its weights across ranks"
        if isinstance(parameter, DTensor):
            return "its weights are DTensors sharded across ranks (FSDP2 or tensor parallel)"
    return None


def _why_not_fusable(model: nn.Module, head: nn.Module | None, sharding: str | None) -> str | None:
    config = getattr(model, "config", None)
    if sharding is not None:
        return sharding
    if type(head) is not nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain nn.Linear"
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r} may post-process its logits"
    if head not in model.children():
        return "its lm_head is not a direct child module"
    return None


def choose_lm_head(model: nn.Module, mode: str, sharding: str | None = None) -> HeadChoice:
    """Whether the loss can take ``model``'s lm_head (``mode`` auto / always / never), with a one-line reason.

    ``model`` may be wrapped by torch.compile, PEFT or accelerate (unwrap DDP first); ``sharding`` is
    :func:`head_sharding`'s answer. ``mode='always'`` raises with the reason where the head cannot be fused.
    """
    if mode not in FUSED_LM_HEAD_MODES:
        raise ConfigError(f"fused_lm_head={mode!r} must be one of {', '.join(FUSED_LM_HEAD_MODES)}.")
    logits_path = "logits path: the model returns full [batch, seq, vocab] logits and the loss chunks them"
    if mode == "never":
        return HeadChoice(None, f"{logits_path}, because fused_lm_head='never'")
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    reason = _why_not_fusable(base, head, sharding)
    if reason is None:
        out_features, in_features = head.weight.shape
        return HeadChoice(
            head,
            f"fused lm_head: the {out_features}x{in_features} lm_head is multiplied into the chunked loss, "
            "so the [tokens, vocab] logits never exist in full",
        )
    if mode == "always":
        raise ConfigError(f"fused_lm_head='always' but {reason}; use fused_lm_head='auto' or 'never'.")
    return HeadChoice(None, f"{logits_path}; the lm_head is not fused because {reason}")
