from __future__ import annotations

import math
import sys

import evaluate
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import LlamaForCausalLM

from hf_capgap.models import evaluate_perplexity, perplexity_metric_path, run_lm_eval_harness
from tests.conftest import tiny_llama

VOCAB = 61


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return tiny_llama(VOCAB, hidden=32, layers=2)


def packed(rows: int, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def plain_torch_loss(model: LlamaForCausalLM, dataset: Dataset) -> float:
    """Reference: one forward over every row, mean cross-entropy over all shifted tokens."""
    ids = torch.tensor(dataset["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()


def test_metric_module_is_token_weighted():
    metric = evaluate.load(perplexity_metric_path(), keep_in_memory=True)
    result = metric.compute(predictions=[6.0, 1.0], references=[3, 1])
    assert result["eval_loss"] == pytest.approx(7.0 / 4)
    assert result["perplexity"] == pytest.approx(math.exp(7.0 / 4))
    assert result["num_tokens"] == 4


def test_metric_module_rejects_zero_counts():
    metric = evaluate.load(perplexity_metric_path(), keep_in_memory=True)
    with pytest.raises(ValueError, match="token counts"):
        metric.compute(predictions=[1.0], references=[0])


def test_matches_plain_torch_with_uneven_last_batch(tiny_model):
    dataset = packed(rows=7)
    expected = plain_torch_loss(tiny_model, dataset)
    result = evaluate_perplexity(tiny_model, dataset, batch_size=3)
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["num_tokens"] == 7 * 11


def test_max_batches_limits_rows_and_restores_training_mode(tiny_model):
    dataset = packed(rows=6)
    tiny_model.train()
    result = evaluate_perplexity(tiny_model, dataset, batch_size=2, max_batches=1)
    assert tiny_model.training
    assert result["num_tokens"] == 2 * 11
    assert result["eval_loss"] == pytest.approx(
        plain_torch_loss(tiny_model.eval(), dataset.select(range(2))), rel=1e-5
    )


def test_empty_dataset_fails_before_loading_the_metric(tiny_model, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("metric loaded for empty data"))
    with pytest.raises(ValueError, match="empty"):
        evaluate_perplexity(tiny_model, Dataset.from_dict({"input_ids": []}))


def test_missing_input_ids_and_ragged_rows_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="'input_ids'"):
        evaluate_perplexity(tiny_model, Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="fixed length"):
        evaluate_perplexity(tiny_model, Dataset.from_dict({"input_ids": [[1, 2, 3], [1, 2]]}))


def test_harness_adapter_names_the_extra_when_lm_eval_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise, installed or not
    with pytest.raises(ImportError, match=r"pip install 'hf_capgap\[harness\]'"):
        run_lm_eval_harness("some/model", ["hellaswag"])
