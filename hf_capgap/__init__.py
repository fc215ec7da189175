"""hf_capgap: distill language models along the law of capacity gap, on the Hugging Face stack.

Public names are imported lazily so that light entry points (``hf_capgap.law``, ``hf-capgap --help``)
start without loading torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DistillationConfig": "hf_capgap.trainer",
    "DistillationTrainer": "hf_capgap.trainer",
    "divergence": "hf_capgap.losses",
    "TeacherCache": "hf_capgap.cache",
    "CapacityGapLaw": "hf_capgap.law",
    "SweepConfig": "hf_capgap.sweep",
    "plan": "hf_capgap.sweep",
    "run_sweep": "hf_capgap.sweep",
    "sweep_status": "hf_capgap.sweep",
    "prune_model": "hf_capgap.pruning",
    "PruneShape": "hf_capgap.pruning",
    "save_pruned": "hf_capgap.pruning",
    "build_ladder": "hf_capgap.ladder",
    "count_parameters": "hf_capgap.ladder",
    "LadderRung": "hf_capgap.ladder",
    "pretrain": "hf_capgap.ladder",
    "load_teacher": "hf_capgap.ladder",
    "load_frozen_teacher": "hf_capgap.models",
    "ensure_ladder": "hf_capgap.ladder",
    "load_corpus": "hf_capgap.data",
    "train_tokenizer": "hf_capgap.data",
    "default_tokenizer": "hf_capgap.data",
    "tokenize_and_pack": "hf_capgap.data",
    "prepare_dataset": "hf_capgap.data",
    "check_same_vocabulary": "hf_capgap.models",
    "evaluate_perplexity": "hf_capgap.models",
    "LossSpec": "hf_capgap.losses",
    "distillation_loss": "hf_capgap.losses",
    "Prediction": "hf_capgap.law",
    "Suggestion": "hf_capgap.law",
    "parse_params": "hf_capgap.law",
    "push_student": "hf_capgap.hub",
    "render_model_card": "hf_capgap.hub",
    "write_model_card": "hf_capgap.hub",
    "StudentCardInfo": "hf_capgap.hub",
    "HubUploadError": "hf_capgap.hub",
    "HfCapgapError": "hf_capgap.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_capgap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
