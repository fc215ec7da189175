"""How many parameters a model holds, counted one way by every stage (the plan, pruning, the sweep, scores).

:func:`hf_capgap.ladder.count_parameters` computes the same number from a LLaMA config without building
the model; this counts the tensors of a built one (on the meta device too), importing nothing.
"""

from __future__ import annotations

from typing import Any


def count_model_parameters(model: Any) -> int:
    """Every parameter of ``model``, tied ones once (as ``model.parameters()`` yields them).

    Count before ZeRO-3 partitions the model: a partitioned parameter holds none of its elements here.
    """
    return sum(parameter.numel() for parameter in model.parameters())
