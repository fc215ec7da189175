"""Model cards derived from the capacity-gap law.

The card states where the teacher/student pair sits against the law (fitted or the paper's), how
the teacher was pruned and distilled, and how the student compares to the teacher, the pruned
initialisation and a same-size model trained from scratch.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError
from hf_capgap.law import CONFIDENCE, CapacityGapLaw, format_params
from hf_capgap.utils.artifacts import atomic_write_bytes

CARD_TEMPLATE = "student.md"
PLOT_NAME = "capacity_gap_law.png"
CARD_TAGS = ("distillation", "capacity-gap-law", "hf_capgap")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class PruningShape:
    """Architecture of the pruned student, and the fraction of teacher parameters it kept."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    kept_fraction: float


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """Distillation loss and the hyperparameters a reader needs to reproduce the run."""

    loss: str
    alpha: float
    temperature: float
    learning_rate: float
    steps: int
    tokens: int
    batch_size: int
    seq_len: int
    generation: str | None = None  # on-policy runs: how completions were sampled and scored, how tokens count


@dataclasses.dataclass(frozen=True)
class HeldOutScore:
    """Held-out mean token cross-entropy (nats) and its perplexity."""

    loss: float
    perplexity: float


@dataclasses.dataclass(frozen=True)
class ChainStep:
    """One model of a teacher-assistant chain: ``role`` is teacher, assistant or student; ``name`` how the card
    names it (never a local path); ``loss`` its held-out loss; ``tokens`` what its distillation trained on."""

    role: str
    name: str
    params: int
    loss: float
    tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class StudentCardInfo:
    """Everything the student card says; ``law`` is ``CapacityGapLaw.to_dict()`` of the law that chose
    the teacher: the card places the pair with that law's own line (``predict``) and prints only its
    parameters, so a card never contradicts ``suggest``.

    ``teacher`` is how the card names the teacher; ``teacher_hub_id`` (a Hub id, never a local path)
    becomes ``base_model`` and the link, and is left out when the teacher is not on the Hub.
    ``license`` None leaves the license for the author to fill in (a student inherits its teacher's
    terms, so no default is assumed). ``repo_id`` is the Hub repo "How to use" loads from.
    ``scratch_eval`` None reports the from-scratch baseline as not run. ``chain`` (teacher -> assistants ->
    student) says the student was distilled through teacher assistants; empty when distilled from the teacher.
    ``chain_planned_by_law`` says who chose the assistants (the law, or the user's list); the card checks each
    step's ratio against ``law`` itself and says "within the law" only when every step is.
    """

    model_name: str
    teacher: str
    teacher_params: int
    student_params: int
    law: Mapping[str, Any]
    pruning: PruningShape
    training: TrainingSetup
    teacher_eval: HeldOutScore
    pruned_eval: HeldOutScore
    distilled_eval: HeldOutScore
    scratch_eval: HeldOutScore | None
    eval_dataset: str
    datasets: Sequence[str] = ()
    license: str | None = None
    teacher_hub_id: str | None = None
    repo_id: str | None = None
    law_plot: str | None = None
    limitations: Sequence[str] = ()
    chain: Sequence[ChainStep] = ()
    chain_planned_by_law: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudentCardInfo:
        """Build from plain JSON-like data (nested mappings for the nested records)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown card info field(s) {unknown}; expected only {sorted(known)}.")
        missing = sorted(
            field.name
            for field in dataclasses.fields(cls)
            if field.name not in data
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"card info is missing field(s) {missing}.")
        nested = {"pruning": PruningShape, "training": TrainingSetup}
        nested |= {name: HeldOutScore for name in ("teacher_eval", "pruned_eval", "distilled_eval", "scratch_eval")}
        values = dict(data)
        for name, record in nested.items():
            value = values.get(name)
            if isinstance(value, Mapping):
                try:
                    values[name] = record(**value)
                except TypeError as err:
                    raise ConfigError(
                        f"card info field {name!r}: {err}; expected fields of {record.__name__}."
                    ) from err
        try:
            values["chain"] = [
                step if isinstance(step, ChainStep) else ChainStep(**step) for step in values.get("chain", ())
            ]
        except TypeError as err:
            raise ConfigError(f"card info field 'chain': {err}; expected fields of ChainStep.") from err
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot make a truthful card."""
        for name in ("teacher_params", "student_params"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive parameter count, got {getattr(self, name)}.")
        if not isinstance(self.law, Mapping):
            raise ConfigError(f"law is a {type(self.law).__name__}; pass CapacityGapLaw.to_dict().")
        ci = self.law.get("ratio_ci")
        if ci is not None and (len(ci) != 2 or ci[0] > ci[1]):
            raise ConfigError(f"law['ratio_ci'] must be [low, high] with low <= high, or None; got {ci}.")
        law = card_law(self.law)
        if law.ratio <= 0 or (not law.through_origin and law.slope_affine <= 0):
            raise ConfigError(f"the law's slope must be positive: {law.formula()}.")
        if not 0 < self.pruning.kept_fraction <= 1:
            raise ConfigError(f"pruning.kept_fraction must be in (0, 1], got {self.pruning.kept_fraction}.")
        if not self.eval_dataset:
            raise ConfigError("eval_dataset is empty: name the held-out data the losses were measured on.")
        for name in ("teacher_hub_id", "repo_id"):
            value = getattr(self, name)
            if value is not None and (value.count("/") != 1 or value.startswith((".", "/", "~"))):
                raise ConfigError(f"{name}={value!r} must be a Hub id 'namespace/name', not a local path.")
        if self.chain and (len(self.chain) < 3 or self.chain[0].role != "teacher" or self.chain[-1].role != "student"):
            raise ConfigError("chain must run teacher -> at least one assistant -> student, or be empty.")
        if self.law_plot is not None and not Path(self.law_plot).is_file():
            raise FileNotFoundError(f"law_plot {self.law_plot} does not exist; pass the PNG from CapacityGapLaw.plot.")


def _as_info(info: StudentCardInfo | Mapping[str, Any]) -> StudentCardInfo:
    info = info if isinstance(info, StudentCardInfo) else StudentCardInfo.from_dict(info)
    info.validate()
    return info


def card_law(law: Mapping[str, Any]) -> CapacityGapLaw:
    """The ``CapacityGapLaw`` a card's ``law`` field describes; ValueError naming what is wrong."""
    try:
        return CapacityGapLaw.from_dict(law)
    except ValueError as err:
        raise ConfigError(f"law: {err} Pass CapacityGapLaw.to_dict() of the law that chose the teacher.") from err


def law_position(info: StudentCardInfo) -> dict[str, Any]:
    """Where this teacher/student pair sits against the law that chose it (the line its predictions use).

    The optimum and its interval come from ``CapacityGapLaw.predict``, as in ``suggest``: a
    through-origin law places the teacher with its ratio and ``ratio_ci``, an affine one with its
    slope, intercept and bootstrap band. ``law_teacher_params`` is None where an affine law predicts
    no teacher larger than this student.
    """
    law = card_law(info.law)
    position: dict[str, Any] = {
        "actual_ratio": info.teacher_params / info.student_params,
        "formula": law.formula(),
        "through_origin": law.through_origin,
        "r2": law.r2 if law.through_origin else law.r2_affine,
        "law_teacher_params": None,
        "teacher_interval": None,
        "within_ci": None,
    }
    try:
        optimum = law.predict(info.student_params)
    except ValueError:
        return position
    position["law_teacher_params"] = float(optimum.params)
    if optimum.lo is not None:
        position["teacher_interval"] = [float(optimum.lo), float(optimum.hi)]
        position["within_ci"] = bool(optimum.lo <= info.teacher_params <= optimum.hi)
    return position


def chain_claim(info: StudentCardInfo) -> str:
    """Who chose the assistants, each step's teacher/student ratio and the law's optimum for it, and whether
    every step is within the law (its ratio at most the upper end of the law's interval for that step's student,
    or the point prediction where the law has none: the bound ``CapacityGapLaw.chain`` plans with)."""
    law = card_law(info.law)
    sizes = [step.params for step in info.chain]
    ratios = [above / below for above, below in zip(sizes, sizes[1:], strict=False)]
    origin = "assistants planned by the law" if info.chain_planned_by_law else "assistants chosen by the user"
    steps = f"{origin}; step ratios {', '.join(f'{ratio:.2f}x' for ratio in ratios)}"
    try:
        optimum = law.predict([float(size) for size in sizes[1:]])
    except ValueError:
        return f"{steps}; the law predicts no teacher for some of these students, so no step is claimed within it"
    optima = [float(teacher) / size for teacher, size in zip(optimum.params, sizes[1:], strict=True)]
    highs = (
        optimum.params if optimum.hi is None else [max(p, h) for p, h in zip(optimum.params, optimum.hi, strict=True)]
    )
    limits = [float(high) / size for high, size in zip(highs, sizes[1:], strict=True)]
    shown = (
        f"{optima[0]:.3g}x"
        if max(optima) - min(optima) < 1e-3 * max(optima)
        else ", ".join(f"{r:.3g}x" for r in optima)
    )
    beyond = [
        number
        for number, (ratio, limit) in enumerate(zip(ratios, limits, strict=True), 1)
        if ratio > limit * (1 + 1e-9)
    ]
    if not beyond:
        return f"{steps} against the law's optimum of {shown}; every step within the law of capacity gap"
    allowed = ", ".join(f"{limits[number - 1]:.3g}x" for number in beyond)
    return (
        f"{steps} against the law's optimum of {shown}; step {', '.join(map(str, beyond))} past the largest ratio "
        f"the law allows ({allowed})"
    )


def _eval_results(info: StudentCardInfo) -> list[Any]:
    from huggingface_hub import EvalResult

    common = {
        "task_type": "text-generation",
        "task_name": "Causal language modeling",
        "dataset_type": info.eval_dataset,
        "dataset_name": info.eval_dataset,
        "dataset_split": "held-out",
    }
    return [
        EvalResult(**common, metric_type="loss", metric_name="held-out loss", metric_value=info.distilled_eval.loss),
        EvalResult(
            **common,
            metric_type="perplexity",
            metric_name="held-out perplexity",
            metric_value=info.distilled_eval.perplexity,
        ),
    ]


def render_model_card(info: StudentCardInfo | Mapping[str, Any]) -> Any:
    """Render ``hub/templates/student.md`` into a ``huggingface_hub.ModelCard`` with Hub metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    info = _as_info(info)
    if info.license is None:
        warnings.warn(
            f"the card of {info.model_name} states no license: fill in `license:` in its README.md (the student "
            "inherits the terms of its teacher and training data) or set the license setting.",
            UserWarning,
            stacklevel=2,
        )
    card_data = ModelCardData(
        model_name=info.model_name,
        base_model=info.teacher_hub_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS),
        datasets=list(info.datasets) or None,
        license=info.license,
        eval_results=_eval_results(info),
    )
    rows = [("Teacher", info.teacher_eval), ("Pruned student, before distillation", info.pruned_eval)]
    rows += [("Distilled student (this model)", info.distilled_eval)]
    rows.append(("Same-size student trained from scratch", info.scratch_eval))
    template = resources.files("hf_capgap.hub") / "templates" / CARD_TEMPLATE
    return ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        info=info,
        law=card_law(info.law),
        law_confidence=CONFIDENCE,
        position=law_position(info),
        results=rows,
        chain_line=" -> ".join(format_params(step.params) for step in info.chain),
        chain_claim=chain_claim(info) if info.chain else "",
        format_params=format_params,
        plot=PLOT_NAME if info.law_plot is not None else None,
        repo=info.repo_id or f"YOUR_NAMESPACE/{info.model_name}",
    )


def write_model_card(folder: str | os.PathLike, info: StudentCardInfo | Mapping[str, Any]) -> Path:
    """Write ``README.md`` (and the law plot it embeds) into an exported student folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; export the student there first.")
    info = _as_info(info)
    plot_bytes = None
    if info.law_plot is not None:
        plot_bytes = Path(info.law_plot).read_bytes()
        if not plot_bytes.startswith(_PNG_MAGIC):
            raise ConfigError(f"law_plot {info.law_plot} is not a PNG; save the law plot with format='png'.")
    card = render_model_card(info)
    if plot_bytes is not None:
        atomic_write_bytes(folder / PLOT_NAME, plot_bytes)
    readme = folder / "README.md"
    atomic_write_bytes(readme, str(card).encode("utf-8"))
    return readme
