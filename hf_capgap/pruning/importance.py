"""How much each unit matters: first-order Taylor scores on calibration data, or weight magnitude.

Taylor scores follow MiniMA (and LLM-Pruner / Sheared-LLaMA): a mask of ones is multiplied into the
activations each unit owns, and ``|d loss / d mask * mask|`` estimates how much the LM loss would rise
if that unit were zeroed. Masks:

* hidden: the residual stream, i.e. the embedding outputs (token, and position where learned) and every
  attention / MLP output added to it;
* heads: attention outputs before the output projection, one entry per KV group (GQA keeps a KV head
  and its query heads together);
* neurons: MLP activations before the down projection;
* layers: one gate per layer on both of its residual contributions, so a layer's score estimates the
  loss change of skipping it.

Scoring only reads the weights: parameters are frozen for the backward passes and left untouched.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hf_capgap.errors import ConfigError
from hf_capgap.pruning.layouts import (
    HEADS,
    HIDDEN,
    NEURONS,
    PruneShape,
    layer_index,
    layout_for,
    template_name,
)


@dataclass
class ImportanceScores:
    """Per-unit scores of a teacher (higher = keep), and what they were computed from."""

    hidden: Tensor  # (hidden_size,)
    heads: Tensor  # (num_hidden_layers, num_key_value_heads)
    neurons: Tensor  # (num_hidden_layers, intermediate_size)
    layers: Tensor  # (num_hidden_layers,)
    method: str  # "taylor" or "magnitude"
    calibration_tokens: int = 0


def padded_labels(labels: Tensor, attention_mask: Tensor) -> Tensor:
    """``labels`` with -100 wherever the target or the position predicting it is padding.

    Hugging Face causal LMs shift internally (the label at ``t`` is predicted from ``t - 1``), so with
    left padding the first real token would otherwise be a target predicted from a pad position.
    """
    pad = attention_mask == 0
    labels = labels.masked_fill(pad, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(pad[:, :-1], -100)
    return labels


def padded_position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token (0 on left padding), as in generation."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def taylor_importance(
    model: torch.nn.Module, calibration: Iterable[Mapping[str, Tensor]], *, checkpoint_layers: bool = False
) -> ImportanceScores:
    """Average ``|grad x mask|`` of the LM loss over ``calibration`` batches (``input_ids`` [+ labels]).

    With an ``attention_mask``, padding on either side scores the same as the unpadded rows: a position
    is a target only if it and the position predicting it are real tokens (:func:`padded_labels`), and
    models that take ``position_ids`` get each row's positions counted from its first real token.

    ``checkpoint_layers`` keeps only each layer's input for the backward pass and recomputes the rest
    (mask hooks included), so scoring memory stays near one layer's activations.
    """
    config, layout = model.config, layout_for(model.config)
    teacher = PruneShape.of(config)
    layers = model.get_submodule(layout.layers)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    masks = {
        HIDDEN: torch.ones(teacher.hidden_size, dtype=dtype, device=device, requires_grad=True),
        HEADS: torch.ones(
            teacher.num_hidden_layers, teacher.num_key_value_heads, dtype=dtype, device=device, requires_grad=True
        ),
        NEURONS: torch.ones(
            teacher.num_hidden_layers, teacher.intermediate_size, dtype=dtype, device=device, requires_grad=True
        ),
        "layers": torch.ones(teacher.num_hidden_layers, dtype=dtype, device=device, requires_grad=True),
    }

    def residual_write(index: int):
        return lambda module, args, output: output * masks[HIDDEN] * masks["layers"][index]

    def head_gate(index: int):
        def hook(module, args):
            (x,) = args
            grouped = x.unflatten(-1, (teacher.num_key_value_heads, -1)) * masks[HEADS][index][:, None]
            return (grouped.flatten(-2),)

        return hook

    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, out: out * masks[HIDDEN])
        for name in layout.embeddings
    ]
    for index, layer in enumerate(layers):
        attention_out = layer.get_submodule(layout.attention_output)
        mlp_out = layer.get_submodule(layout.mlp_output)
        handles += [
            attention_out.register_forward_pre_hook(head_gate(index)),
            attention_out.register_forward_hook(residual_write(index)),
            mlp_out.register_forward_pre_hook(lambda m, args, i=index: (args[0] * masks[NEURONS][i],)),
            mlp_out.register_forward_hook(residual_write(index)),
        ]
    totals = {name: torch.zeros(mask.shape, dtype=torch.float32, device=device) for name, mask in masks.items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters
    was_training = model.training
    batches = tokens = 0
    try:
        model.eval()
        model.requires_grad_(False)
        if checkpoint_layers:
            _checkpoint_forwards(layers)
        for batch in tqdm(calibration, desc="Taylor importance", unit="batch"):
            input_ids = _checked_input_ids(batch, config.vocab_size)
            labels = torch.as_tensor(batch.get("labels", input_ids))
            attention_mask = batch.get("attention_mask")
            extra = {}
            if attention_mask is not None:  # padding must not enter the loss, or it enters the scores
                attention_mask = torch.as_tensor(attention_mask)
                labels = padded_labels(labels, attention_mask)
                extra = {"attention_mask": attention_mask.to(device)}
                if accepts_position_ids:
                    extra["position_ids"] = padded_position_ids(attention_mask).to(device)
            loss = model(input_ids=input_ids.to(device), labels=labels.to(device), use_cache=False, **extra).loss
            grads = torch.autograd.grad(loss, list(masks.values()))
            for (name, mask), grad in zip(masks.items(), grads, strict=True):
                totals[name] += (grad * mask.detach()).abs().float()
            batches += 1
            tokens += int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
        model.train(was_training)
    if batches == 0:
        raise ConfigError("calibration yielded no batches; pass at least one {'input_ids': ...} batch or None.")
    return ImportanceScores(
        hidden=totals[HIDDEN] / batches,
        heads=totals[HEADS] / batches,
        neurons=totals[NEURONS] / batches,
        layers=totals["layers"] / batches,
        method="taylor",
        calibration_tokens=tokens,
    )


def _checkpoint_forwards(layers: Iterable[torch.nn.Module]) -> None:
    """Route each layer's forward through non-reentrant activation checkpointing (undone by deleting
    the instance attribute); it works in eval mode, unlike transformers' training-only switch."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def magnitude_importance(model: torch.nn.Module) -> ImportanceScores:
    """Data-free fallback: a unit's score is the summed ``|w|`` of every weight entry it owns.

    A layer scores the Frobenius norm of what it writes into the residual stream (its attention and
    MLP output projections).
    """
    warnings.warn(
        "no calibration data: ranking heads, neurons, hidden dims and layers by weight magnitude, which "
        "is a weaker signal than the Taylor scores; pass calibration batches for MiniMA-style pruning.",
        UserWarning,
        stacklevel=3,
    )
    config, layout = model.config, layout_for(model.config)
    teacher = PruneShape.of(config)
    axes = layout.weight_axes(config)
    scores = {
        HIDDEN: torch.zeros(teacher.hidden_size),
        HEADS: torch.zeros(teacher.num_hidden_layers, teacher.num_key_value_heads),
        NEURONS: torch.zeros(teacher.num_hidden_layers, teacher.intermediate_size),
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            magnitude = param.detach().abs().float()
            index = layer_index(name)
            for dim, axis in axes.get(template_name(name), {}).items():
                others = [d for d in range(magnitude.dim()) if d != dim]
                per_entry = magnitude.sum(dim=others) if others else magnitude
                per_unit = axis.per_unit(per_entry).cpu()
                if axis.unit == HIDDEN:
                    scores[HIDDEN] += per_unit
                else:
                    scores[axis.unit][index] += per_unit
        layers = model.get_submodule(layout.layers)
        layer_scores = torch.tensor(
            [
                float(layer.get_submodule(layout.attention_output).weight.float().norm())
                + float(layer.get_submodule(layout.mlp_output).weight.float().norm())
                for layer in layers
            ]
        )
    return ImportanceScores(scores[HIDDEN], scores[HEADS], scores[NEURONS], layer_scores, method="magnitude")


def _checked_input_ids(batch: Mapping[str, Tensor], vocab_size: int) -> Tensor:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ConfigError("each calibration batch must be a dict with an 'input_ids' tensor of shape (batch, seq).")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ConfigError(
            f"calibration input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}."
        )
    if int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0:
        raise ConfigError(
            f"calibration input_ids hold token id {int(input_ids.max())} but the teacher's vocab_size is "
            f"{vocab_size}; tokenize the calibration text with the teacher's tokenizer."
        )
    return input_ids
