"""Helpers every stage uses, importing nothing of hf_capgap but ``hf_capgap.errors``: ``artifacts``
(atomic writes, manifests, fingerprints), ``processes`` (which process of a launch this is, CPU or
accelerator), ``parameters`` (a model's parameter count), ``recipe_args`` (YAML presets with
``--key value`` overrides) and ``training_arguments`` (the one ``TrainingArguments`` builder). Nothing
is imported here, so a light stage (the law) pays only for the helper it uses."""

from __future__ import annotations

__all__ = ["artifacts", "parameters", "processes", "recipe_args", "training_arguments"]
