"""Where a sweep's teachers, tokenizer and data come from: a pretrained ladder preset or a Hub family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.sweep.config import HUB_FAMILIES, SweepConfig
from hf_capgap.utils.parameters import count_model_parameters


def check_hub_access(model_ids: Sequence[str]) -> None:
    """Fail before any work when a Hub teacher is neither cached locally nor reachable."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    missing = [
        model_id for model_id in model_ids if not isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    ]
    if not missing:
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"teachers {missing} are not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
            "downloading them; download them on a machine with network access, or unset HF_HUB_OFFLINE."
        )
    api = HfApi(endpoint=constants.ENDPOINT)
    for model_id in missing:
        try:
            api.model_info(model_id, timeout=10)
        except Exception as err:  # any failure here means the sweep could not load this teacher
            raise ConfigError(
                f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} for teacher {model_id!r} ({err}); "
                "the sweep needs network access to download its teachers, or a local cache holding them."
            ) from err


class TeacherSource:
    """Teachers, tokenizer and data of a family: a pretrained ladder preset or a Hub family."""

    def __init__(self, config: SweepConfig, tokenizer_from: str) -> None:
        self.config = config
        self.tokenizer: Any = None
        self._ladder_paths: dict[str, Path] = {}
        if config.family in HUB_FAMILIES:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        else:
            from hf_capgap.ladder import ensure_ladder, load_teacher

            ladder_dir = config.ladder_dir or str(Path("outputs") / "ladder" / config.family)
            self._ladder_paths = {path.name: path for path in ensure_ladder(config.family, ladder_dir)}
            self.tokenizer = load_teacher(self._ladder_paths[tokenizer_from]).tokenizer

    def load(self, name: str) -> tuple[Any, int]:
        """The teacher model in eval mode and its exact total parameter count."""
        if name in self._ladder_paths:
            from hf_capgap.ladder import load_teacher

            model = load_teacher(self._ladder_paths[name], teacher_dtype=self.config.teacher_dtype).model
        else:
            from hf_capgap.models import load_frozen_teacher

            model = load_frozen_teacher(name, teacher_dtype=self.config.teacher_dtype)
        if model.config.max_position_embeddings < self.config.seq_len:
            raise ConfigError(
                f"seq_len={self.config.seq_len} exceeds teacher {name}'s max_position_embeddings="
                f"{model.config.max_position_embeddings}; lower seq_len."
            )
        return model.eval(), count_model_parameters(model)

    def data(self) -> dict[str, Any]:
        """The shared token budget (first rows of train), the assistants' (first rows too), held-out rows and
        calibration batches."""
        import torch

        from hf_capgap.data import load_corpus, tokenize_and_pack

        config = self.config
        packed = tokenize_and_pack(load_corpus(), self.tokenizer, config.seq_len)
        per_step = config.batch_size * config.gradient_accumulation_steps
        train_rows = config.steps * per_step
        assistant_steps = config.assistant_token_budget // config.tokens_per_step if config.assistants else 0
        assistant_rows = assistant_steps * per_step
        for split, needed in (("train", max(train_rows, assistant_rows)), ("validation", config.eval_rows)):
            if len(packed[split]) < needed:
                raise ConfigError(
                    f"the corpus {split} split packs into {len(packed[split])} rows of {config.seq_len} tokens, "
                    f"fewer than the {needed} the sweep needs; lower tokens_per_run, assistant_tokens, eval_rows or "
                    "seq_len."
                )
        train = packed["train"].select(range(train_rows))
        calibration_ids = torch.tensor(train[: config.calibration_rows]["input_ids"], dtype=torch.long)
        return {
            "train": train,
            "assistant_train": packed["train"].select(range(assistant_rows)),
            "eval": packed["validation"].select(range(config.eval_rows)),
            "calibration": [{"input_ids": batch} for batch in calibration_ids.split(config.batch_size)],
        }
