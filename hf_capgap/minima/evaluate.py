"""The evaluate stage: held-out loss of teacher, pruned, distilled (and baseline) students.

Every process takes part through ``Trainer.evaluate`` (the held-out rows are split across the launch,
each model runs on its process's device, the teacher in the dtype it was loaded in), so a 7B teacher
is never scored on the main process's CPU. Packed rows all hold ``seq_len`` tokens, so the Trainer's
mean over rows is the token-weighted mean loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_capgap.minima.config import MinimaConfig
from hf_capgap.minima.data import RunData
from hf_capgap.utils.parameters import count_model_parameters


def held_out_score(config: MinimaConfig, model: Any, data: RunData, output_dir: Path) -> dict[str, float | int]:
    """``{"loss", "perplexity", "params"}`` of one model on the held-out rows."""
    from transformers import PrinterCallback, Trainer

    from hf_capgap.data import make_collator
    from hf_capgap.utils.training_arguments import evaluation_arguments

    params = count_model_parameters(model)  # before ZeRO-3 partitions it
    trainer = Trainer(
        model=model,
        args=evaluation_arguments(output_dir, batch_size=config.eval_batch_size, bf16=config.bf16),
        data_collator=make_collator(data.tokenizer),
        eval_dataset=data.eval,
    )
    trainer.remove_callback(PrinterCallback)  # the table reports the scores; no per-model log lines
    loss = float(trainer.evaluate()["eval_loss"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "params": params}


def evaluate_stage(config: MinimaConfig, folders: Mapping[str, Path], data: RunData) -> dict[str, dict]:
    """Scores of each student folder (loaded one at a time, then released).

    The teacher is scored with :func:`held_out_score` by the caller while it is still loaded, so it can be
    freed before the students train.
    """
    from transformers import AutoModelForCausalLM

    output_dir = config.work_dir / "evaluation"
    scores = {}
    for key, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        scores[key] = held_out_score(config, model, data, output_dir)
        del model
    return scores
