"""The export stage: the table a user reads, and the Hub-ready student folder with its model card.

The folder ``<output_dir>/<run_name>/`` appears in one rename, complete: weights, tokenizer, card
(``base_model`` only when the original teacher has a Hub id, never an assistant; the license from the settings
or the teacher; the chain teacher -> assistants -> student when there is one),
the law plot and ``results.json``. Nothing in it names a path on this machine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.minima.config import AUTO_ASSISTANTS, EMBEDDED_DATASET, MinimaConfig
from hf_capgap.minima.data import EMBEDDED_DATASET_NAME, is_local_dataset
from hf_capgap.minima.plan import LADDER_LICENSE, Plan, load_law, run_settings, teacher_hub_id
from hf_capgap.utils.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    atomic_directory,
    atomic_write_json,
    json_sha256,
    read_manifest,
    write_manifest,
)

RUN_KIND = "minima_run"
FORMAT_VERSION = 2
NOT_RUN = "not run"
ROWS = (
    ("teacher", "teacher"),
    ("pruned", "pruned student, before distillation"),
    ("distilled", "distilled student"),
    ("scratch", "same-size student from scratch, same tokens"),
)


def format_table(results: Mapping[str, Any]) -> str:
    """The table a user reads to see what distillation bought."""
    lines = [
        f"MiniMA run {results['run_name']}: {results['choice']}",
        f"{'model':<46}{'params':>14}{'loss':>9}{'ppl':>10}",
    ]
    for key, label in ROWS:
        score = results["eval"].get(key)
        if score is None:
            lines.append(f"{label:<46}{NOT_RUN:>33}")
        else:
            lines.append(f"{label:<46}{score['params']:>14,}{score['loss']:>9.4f}{score['perplexity']:>10.2f}")
    if len(results.get("chain", ())) > 2:
        from hf_capgap.law import format_params

        steps = " -> ".join(f"{format_params(step['params'])} ({step['loss']:.4f})" for step in results["chain"])
        assistant_tokens = sum(step["train_tokens"] for step in results["chain"][1:-1])
        lines.append(f"distilled through assistants: {steps}; the assistants trained on {assistant_tokens:,} tokens")
    scratch = results["eval"].get("scratch")
    tokens = f"{results['train_tokens']:,} tokens each"
    if scratch is None:
        lines.append(f"baseline: {NOT_RUN} (baseline: false); distilled on {results['train_tokens']:,} tokens.")
        return "\n".join(lines)
    gain = scratch["loss"] - results["eval"]["distilled"]["loss"]
    if gain > 0:
        lines.append(f"distillation beat training from scratch by {gain:.4f} nats of held-out loss ({tokens}).")
    else:
        lines.append(
            f"distillation did NOT beat training from scratch at this scale ({-gain:.4f} nats worse, {tokens})."
        )
    return "\n".join(lines)


def teacher_license(config: MinimaConfig, plan: Plan) -> str | None:
    """The student's license: the setting, else the teacher's own card or config; None when unknown."""
    if config.license is not None:
        return config.license
    if plan.teacher_kind == "ladder":
        return LADDER_LICENSE
    try:
        from huggingface_hub import ModelCard

        if plan.teacher_kind == "local":
            readme = Path(plan.teacher) / "README.md"
            if readme.is_file():
                found = ModelCard.load(readme).data.license
                if found:
                    return str(found)
            saved = json.loads((Path(plan.teacher) / "config.json").read_text())
            return saved.get("license")
        return ModelCard.load(plan.teacher).data.license
    except Exception:  # an unreadable or unreachable card leaves the license to the author, with a warning
        return None


def dataset_name(config: MinimaConfig) -> str:
    """How the card names the data, without a local path."""
    if config.dataset == EMBEDDED_DATASET:
        return EMBEDDED_DATASET_NAME
    if is_local_dataset(config.dataset):
        return f"local files ({Path(config.dataset).name})"
    return config.dataset


def _other_source(config: MinimaConfig) -> str:
    """Where the completions of micro-batches not sampled from the student come from."""
    return "teacher-sampled" if config.seq_kd else "dataset"


def loss_description(config: MinimaConfig) -> str:
    """The card's loss: alpha x divergence + (1 - alpha) x CE, and when the run generates, the divergence alone on
    the student's own samples (the trainer scores them so, whatever alpha)."""
    mixed = f"{1 - config.alpha:g} x LM cross-entropy + {config.alpha:g} x {config.loss}"
    if not config.generates:
        return mixed
    if config.lmbda == 1:
        return f"{config.loss} alone (every micro-batch student-sampled)"
    if config.lmbda == 0:
        return f"{mixed} (teacher-sampled completions)"
    return (
        f"{config.loss} alone on student-sampled micro-batches (probability lmbda={config.lmbda:g}); {mixed} on "
        f"{_other_source(config)} micro-batches"
    )


def generation_description(config: MinimaConfig) -> str | None:
    """For a run that generates: GKD's settings, how each kind of micro-batch is scored and how tokens count."""
    if not config.generates:
        return None
    row = config.prompt_tokens + config.max_completion_length
    return (
        f"On-policy distillation (GKD): lmbda={config.lmbda:g}, seq_kd={str(config.seq_kd).lower()}. With "
        f"probability lmbda a micro-batch's completions are sampled from the student, else "
        f"{'from the teacher' if config.seq_kd else 'taken from the dataset'}; each prompt is the first "
        f"prompt_tokens={config.prompt_tokens} tokens of a packed training row, and completions are sampled up to "
        f"max_completion_length={config.max_completion_length} tokens (stopping at EOS) at sampling_temperature="
        f"{config.sampling_temperature:g}, top_k={config.top_k}, top_p={config.top_p:g} (the loss's temperature is "
        f"separate). Student-sampled micro-batches are scored by the divergence alone; {_other_source(config)} ones "
        f"by alpha x divergence + (1 - alpha) x cross-entropy; every loss is on completion tokens only. Tokens count "
        f"prompt + completion tokens per row ({config.prompt_tokens} + {config.max_completion_length} = {row}; a "
        "completion stopping at EOS counts as full, so they are an upper bound)."
    )


PATH_SETTINGS = ("output_dir", "ladder_dir", "student_init", "law", "teacher", "dataset")


def public_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings as results.json publishes them: local paths cut to their last component."""
    public = dict(settings)
    for key in PATH_SETTINGS:
        value = public.get(key)
        if isinstance(value, str) and (Path(value).exists() or value.startswith((".", "/", "~")) or "*" in value):
            public[key] = Path(value).name
    return public


def export_run(config: MinimaConfig, plan: Plan, results: Mapping[str, Any], distilled_dir: Path) -> None:
    """Write the Hub-ready student folder (weights, tokenizer, card, law plot, results.json) in one rename."""
    from transformers import AutoConfig

    from hf_capgap.hub import ChainStep, HeldOutScore, PruningShape, StudentCardInfo, TrainingSetup, write_model_card

    law = load_law(config)
    student_config = AutoConfig.from_pretrained(distilled_dir)
    scores = {
        key: None if value is None else HeldOutScore(value["loss"], value["perplexity"])
        for key, value in results["eval"].items()
    }
    chain = results.get("chain", ())
    steps = [ChainStep(s["role"], s["name"], s["params"], s["loss"], s["train_tokens"]) for s in chain]
    with atomic_directory(config.run_dir, overwrite=True) as tmp:
        for item in distilled_dir.iterdir():
            if item.is_file() and item.name != MANIFEST_NAME:
                shutil.copy2(item, tmp / item.name)
        plot = config.work_dir / "law.png"
        law.plot(plot, mark=(results["eval"]["distilled"]["params"], plan.teacher_params))
        info = StudentCardInfo(
            model_name=config.run_name,
            teacher=Path(plan.teacher).name if plan.teacher_kind == "local" else plan.teacher,
            teacher_hub_id=teacher_hub_id(config, plan),
            license=teacher_license(config, plan),
            repo_id=config.push_to_hub,
            teacher_params=plan.teacher_params,
            student_params=results["eval"]["distilled"]["params"],
            law=law.to_dict(),
            pruning=PruningShape(
                hidden_size=student_config.hidden_size,
                num_layers=student_config.num_hidden_layers,
                num_heads=student_config.num_attention_heads,
                num_kv_heads=getattr(student_config, "num_key_value_heads", student_config.num_attention_heads),
                intermediate_size=student_config.intermediate_size,
                kept_fraction=results["kept_fraction"],
            ),
            training=TrainingSetup(
                loss=loss_description(config),
                alpha=config.alpha,
                temperature=config.temperature,
                learning_rate=config.learning_rate,
                steps=results["steps"],
                tokens=results["train_tokens"],
                batch_size=config.batch_size,
                seq_len=plan.seq_len,
                generation=generation_description(config),
            ),
            teacher_eval=scores["teacher"],
            pruned_eval=scores["pruned"],
            distilled_eval=scores["distilled"],
            scratch_eval=scores.get("scratch"),
            eval_dataset=dataset_name(config),
            law_plot=str(plot),
            chain=steps if len(steps) > 2 else (),  # a planned chain without assistants is a direct distillation
            chain_planned_by_law=config.assistants.strip().lower() == AUTO_ASSISTANTS,
        )
        write_model_card(tmp, info)
        atomic_write_json(tmp / "results.json", {**results, "settings": public_settings(results["settings"])})
        write_manifest(
            tmp,
            RUN_KIND,
            FORMAT_VERSION,
            {"settings_sha256": json_sha256(run_settings(config, plan)), "repo_id": config.push_to_hub},
        )


def finished_results(config: MinimaConfig, plan: Plan) -> dict[str, Any] | None:
    """results.json of a complete export made from these settings; None if there is none yet, or if
    its card names another Hub repo than ``push_to_hub`` (the export is then rebuilt from the
    finished stages, without training)."""
    if not config.run_dir.exists():
        return None
    try:
        manifest = read_manifest(
            config.run_dir,
            RUN_KIND,
            FORMAT_VERSION,
            expected={"settings_sha256": json_sha256(run_settings(config, plan))},
            verify_files=True,
        )
    except ArtifactError as err:
        raise ConfigError(
            f"{config.run_dir} holds another run ({err}); choose another run_name or remove that folder."
        ) from None
    if manifest.get("repo_id") != config.push_to_hub:
        return None
    return json.loads((config.run_dir / "results.json").read_text())
