"""Held-out evaluation of causal LMs: perplexity, and an optional lm-evaluation-harness adapter.

Perplexity is aggregated by the `evaluate` module shipped in ``hf_capgap/models/perplexity``
(loaded by path, so it works offline): every batch contributes its summed token NLL and token count,
which makes the result token-weighted rather than a mean of batch means.
"""

from __future__ import annotations

import importlib
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from hf_capgap.errors import ConfigError

PERPLEXITY_METRIC_NAME = "perplexity"


def perplexity_metric_path() -> str:
    """Filesystem path of the shipped perplexity metric module, for ``evaluate.load``."""
    return str(resources.files("hf_capgap.models") / PERPLEXITY_METRIC_NAME)


def _check_packed(dataset: Any, batch_size: int, max_batches: int | None) -> int:
    """Validate inputs before any forward pass; return the packed row length."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1 or None, got {max_batches}.")
    if "input_ids" not in dataset.column_names:
        raise ConfigError(
            f"dataset has no 'input_ids' column (columns: {dataset.column_names}); "
            "tokenize and pack it first (hf_capgap.data.tokenize_and_pack)."
        )
    if len(dataset) == 0:
        raise ConfigError("dataset is empty: perplexity needs at least one packed row of input_ids.")
    lengths = {len(row) for row in dataset[: min(len(dataset), 64)]["input_ids"]}  # later rows: checked by torch
    if len(lengths) != 1:
        raise ConfigError(f"input_ids rows must have one fixed length (packed), found lengths {sorted(lengths)}.")
    (length,) = lengths
    if length < 2:
        raise ConfigError(f"packed rows must hold at least 2 tokens to predict one, got length {length}.")
    return length


@torch.inference_mode()
def _summed_nll(model: Any, input_ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropies (nats) over a batch, and the number of predicted tokens."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    return nll.item(), targets.numel()


def evaluate_perplexity(
    model: Any,
    dataset: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """Mean token cross-entropy and perplexity of ``model`` on packed ``input_ids`` rows.

    Labels are the inputs shifted by one inside each row, as in causal-LM training. Returns
    ``{"eval_loss", "perplexity", "num_tokens"}``; the model's train/eval mode is restored.
    """
    import evaluate

    _check_packed(dataset, batch_size, max_batches)
    metric = evaluate.load(perplexity_metric_path(), keep_in_memory=True)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for index, start in enumerate(range(0, len(dataset), batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            rows = dataset[start : start + batch_size]["input_ids"]
            input_ids = torch.as_tensor(rows, dtype=torch.long, device=device)
            nll, count = _summed_nll(model, input_ids)
            metric.add_batch(predictions=[nll], references=[count])
    finally:
        model.train(was_training)
    result = metric.compute()
    return {
        "eval_loss": float(result["eval_loss"]),
        "perplexity": float(result["perplexity"]),
        "num_tokens": int(result["num_tokens"]),
    }


def run_lm_eval_harness(model_dir: str, tasks: list[str], **kwargs: Any) -> dict[str, Any]:
    """Score an exported student on lm-evaluation-harness ``tasks`` (needs the ``harness`` extra).

    Extra keyword arguments go to ``lm_eval.simple_evaluate`` (``num_fewshot``, ``limit``,
    ``batch_size`` ...). Remote code is never trusted.
    """
    if not tasks:
        raise ConfigError("tasks is empty: name at least one lm-evaluation-harness task, e.g. ['hellaswag'].")
    try:
        lm_eval = importlib.import_module("lm_eval")
    except ImportError as err:
        raise ImportError(
            "run_lm_eval_harness needs lm-evaluation-harness, which is an optional extra: "
            "pip install 'hf_capgap[harness]'"
        ) from err
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},trust_remote_code=False",
        tasks=list(tasks),
        **kwargs,
    )
