"""Model cards derived from the law, and pushing an exported student to the Hugging Face Hub without
its pickles. Imports the law, not the training stack.
"""

from __future__ import annotations

from hf_capgap.hub.card import (
    CARD_TAGS,
    CARD_TEMPLATE,
    PLOT_NAME,
    ChainStep,
    HeldOutScore,
    PruningShape,
    StudentCardInfo,
    TrainingSetup,
    card_law,
    law_position,
    render_model_card,
    write_model_card,
)
from hf_capgap.hub.push import (
    PICKLE_PATTERNS,
    HubUploadError,
    check_student_folder,
    is_pickle_file,
    known_tokens,
    missing_student_files,
    push_student,
    retry_command,
)

__all__ = [
    "CARD_TEMPLATE",
    "PLOT_NAME",
    "CARD_TAGS",
    "PICKLE_PATTERNS",
    "HubUploadError",
    "PruningShape",
    "TrainingSetup",
    "HeldOutScore",
    "ChainStep",
    "StudentCardInfo",
    "card_law",
    "law_position",
    "render_model_card",
    "write_model_card",
    "missing_student_files",
    "check_student_folder",
    "retry_command",
    "is_pickle_file",
    "known_tokens",
    "push_student",
]
