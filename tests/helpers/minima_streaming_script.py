"""The MiniMA data and training stages on a stream; launched by tests under accelerate (2 CPU processes).

Argument: a folder holding ``values.json`` (the recipe config). Each rank runs the real stages
(prepare_data, distill_stage, scratch_stage), records the rows every training step received, and
writes ``rank{N}.json``: the held-out rows and each stage's training rows on that rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import transformers

from hf_capgap.minima import build_config, make_plan
from hf_capgap.minima import data as minima_data
from hf_capgap.minima import distill as minima_distill
from hf_capgap.minima import teacher as minima_teacher
from hf_capgap.utils.processes import process_state

SEEN: list[list[int]] = []
_training_step = transformers.Trainer.training_step


def recording_training_step(self, model, inputs, *args, **kwargs):
    SEEN.extend(inputs["input_ids"].tolist())
    return _training_step(self, model, inputs, *args, **kwargs)


def main(out: Path) -> None:
    transformers.Trainer.training_step = recording_training_step
    config = build_config(json.loads((out / "values.json").read_text()))
    plan = make_plan(config)
    location = minima_teacher.teacher_location(config, plan)
    tokenizer = minima_teacher.load_tokenizer(config, location)
    state = process_state()
    with state.main_process_first():
        data = minima_data.prepare_data(config, plan, tokenizer)
    teacher = minima_teacher.load_teacher(config, plan, location)
    teacher_id = minima_teacher.teacher_identity(plan, location, teacher)
    student = Path(config.student_init)
    minima_distill.distill_stage(config, plan, teacher, student, data, teacher_id)
    distilled = SEEN.copy()
    SEEN.clear()
    minima_distill.scratch_stage(config, plan, student, data)
    report = {"eval": list(data.eval["input_ids"]), "distill": distilled, "scratch": SEEN}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(report))
    state.wait_for_everyone()
    os._exit(0)  # results are on disk; skip gloo's interpreter-exit destructors (see ddp_train_script.py)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
