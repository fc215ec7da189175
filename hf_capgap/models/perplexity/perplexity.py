"""Perplexity from summed negative log-likelihoods, as an `evaluate` module loaded by path.

The Hub's ``perplexity`` metric runs a model itself and needs the network; this one only
aggregates numbers the caller already computed, so it works offline and on any model. Each
prediction is a summed negative log-likelihood (in nats) and its reference is the number of tokens
it covers, so batches of any size combine token-weighted. Per-token NLLs are the special case of a
count of 1.
"""

from __future__ import annotations

import math

import datasets
import evaluate

_DESCRIPTION = """
Token-weighted mean negative log-likelihood and its exponential, the perplexity.
`predictions` are summed NLLs in nats, `references` the token counts they cover.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): summed negative log-likelihood (natural log) of a group of tokens.
    references (list of int): number of predicted tokens in each group (positive).
Returns:
    eval_loss (float): sum(predictions) / sum(references), the mean NLL per token.
    perplexity (float): exp(eval_loss).
    num_tokens (int): sum(references).
Example:
    >>> metric = evaluate.load("hf_capgap/models/perplexity")
    >>> metric.compute(predictions=[6.0, 2.0], references=[3, 1])["eval_loss"]
    2.0
"""


class Perplexity(evaluate.Metric):
    """Aggregates summed NLLs and token counts into mean loss and perplexity."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[float], references: list[int]) -> dict[str, float | int]:
        if not references:
            raise ValueError("perplexity needs at least one (summed NLL, token count) pair; got none.")
        if any(count <= 0 for count in references):
            raise ValueError("perplexity references are token counts and must all be positive.")
        if any(nll < 0 or math.isnan(nll) for nll in predictions):
            raise ValueError("perplexity predictions are negative log-likelihoods and must be >= 0 (not NaN).")
        num_tokens = int(sum(references))
        eval_loss = math.fsum(predictions) / num_tokens
        return {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss), "num_tokens": num_tokens}
