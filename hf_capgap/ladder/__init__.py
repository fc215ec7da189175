"""The embedded model family (a ladder of LLaMA-architecture sizes) and its pretraining on the
embedded corpus, used to measure the law at toy scale.
"""

from __future__ import annotations

from hf_capgap.ladder.ladder import (
    LADDERS,
    LadderPreset,
    LadderRung,
    build_ladder,
    count_parameters,
    ladder_config,
    rung_name,
)
from hf_capgap.ladder.pretraining import (
    PRETRAIN_PRESETS,
    TEACHER_FORMAT_VERSION,
    TEACHER_KIND,
    WORK_DIR_NAME,
    Checkpoint,
    LadderRun,
    LadderTeacher,
    PretrainSettings,
    ensure_ladder,
    last_complete_checkpoint,
    load_teacher,
    preset_rungs,
    pretrain,
)

__all__ = [
    "LadderPreset",
    "LADDERS",
    "LadderRung",
    "count_parameters",
    "ladder_config",
    "build_ladder",
    "rung_name",
    "TEACHER_KIND",
    "TEACHER_FORMAT_VERSION",
    "WORK_DIR_NAME",
    "Checkpoint",
    "last_complete_checkpoint",
    "PretrainSettings",
    "LadderRun",
    "PRETRAIN_PRESETS",
    "preset_rungs",
    "pretrain",
    "LadderTeacher",
    "load_teacher",
    "ensure_ladder",
]
