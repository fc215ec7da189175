"""Setting the trainer up: the student as SFTTrainer loads one, its tokenizer, and the real vocabulary
both sides (and a teacher cache) are compared on; checked before the teacher loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from hf_capgap.errors import ConfigError
from hf_capgap.losses.lm_head import base_model
from hf_capgap.models import check_logits_cover, vocabulary_fingerprint


def load_student(model: PreTrainedModel | str | None, init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """The student as SFTTrainer loads one from a path (``model_init_kwargs``), checked before the teacher loads."""
    if model is None:
        raise ConfigError("model (the student) is required: pass a causal LM or a path.")
    if isinstance(model, str):
        from trl.trainer.utils import create_model_from_path

        return create_model_from_path(model, **{"trust_remote_code": False, **(init_kwargs or {})})
    return model


def tokenizer_for(model: PreTrainedModel, processing_class: Any) -> Any:
    """The student's tokenizer: given, or saved next to the student's weights (as SFTTrainer loads it)."""
    if processing_class is not None:
        return processing_class
    path = getattr(model, "name_or_path", "") or ""
    if path and (Path(path) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    raise ConfigError(
        "processing_class is required: pass the student's tokenizer (the teacher's, for a pruned student). It "
        "tokenizes text / chat datasets, pads batches and names the real vocabulary both sides are compared on."
    )


def real_vocabulary(student: nn.Module, teacher: nn.Module | None, tokenizer: Any, cache: Any) -> int:
    """The real vocabulary both sides are compared on; raise on a true mismatch.

    Models often pad their embedding matrix (e.g. 151936 rows for 151665 tokens): only the first
    ``len(tokenizer)`` logits are real, so padding is not a mismatch, and the online teacher and
    the teacher ``cache`` (or None) both normalise over exactly those.
    """
    real = check_logits_cover(base_model(student), tokenizer, "student")
    if teacher is not None:
        check_logits_cover(teacher, tokenizer, "the teacher")
    if cache is not None:
        if cache.real_vocab_size != real:
            raise ConfigError(
                f"{cache.path}: the cache holds teacher distributions over {cache.real_vocab_size} tokens but the "
                f"student's tokenizer has {real}: it was built for another vocabulary. Rebuild it with the "
                "student's tokenizer."
            )
        if cache.manifest["vocabulary_fingerprint"] != vocabulary_fingerprint(tokenizer):
            raise ConfigError(
                f"{cache.path}: the cache was built with a tokenizer of the same size but another token -> id map "
                "than the student's; its ids would name other tokens. Rebuild it with the student's tokenizer."
            )
    return real
