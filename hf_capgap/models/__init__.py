"""Loading and checking models: the frozen teacher loader, vocabulary checks between teacher and
student, and perplexity evaluation (through the shipped ``evaluate`` metric in ``perplexity/``).
"""

from __future__ import annotations

from hf_capgap.models.evaluation import (
    PERPLEXITY_METRIC_NAME,
    evaluate_perplexity,
    perplexity_metric_path,
    run_lm_eval_harness,
)
from hf_capgap.models.teacher_loading import (
    TEACHER_DTYPE_CHOICES,
    check_model_folder,
    load_frozen_teacher,
    resolve_teacher_dtype,
    teacher_device,
    teacher_in_dtype,
)
from hf_capgap.models.vocabulary import (
    SHOWN_DIFFERENCES,
    VocabularyMismatchError,
    check_logits_cover,
    check_same_vocabulary,
    output_rows,
    real_vocab_size,
    vocabulary_differences,
    vocabulary_fingerprint,
)

__all__ = [
    "TEACHER_DTYPE_CHOICES",
    "teacher_device",
    "resolve_teacher_dtype",
    "teacher_in_dtype",
    "load_frozen_teacher",
    "check_model_folder",
    "SHOWN_DIFFERENCES",
    "VocabularyMismatchError",
    "real_vocab_size",
    "output_rows",
    "check_logits_cover",
    "vocabulary_fingerprint",
    "vocabulary_differences",
    "check_same_vocabulary",
    "PERPLEXITY_METRIC_NAME",
    "perplexity_metric_path",
    "evaluate_perplexity",
    "run_lm_eval_harness",
]
