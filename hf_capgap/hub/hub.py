"""Model cards derived from the capacity-gap law, and pushing an exported student to the Hub.

The card states where the teacher/student pair sits against the law (fitted or the paper's), how
the teacher was pruned and distilled, and how the student compares to the teacher, the pruned
initialisation and a same-size model trained from scratch. The upload is the exported folder less
its pickles, found by name and by content (``training_args.bin``, optimizer and RNG states, pickled
weights: they execute code when loaded and ``training_args.bin`` holds the Hub token and local
paths): it is checked for completeness, and for files holding any Hub token of this machine, before
any request, and the token only ever travels in headers.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import glob
import mmap
import os
import shlex
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import IO, Any

import numpy as np
from transformers.utils import logging

from hf_capgap.errors import HfCapgapError
from hf_capgap.utils.artifacts import atomic_write_bytes
from hf_capgap.law import CONFIDENCE, CapacityGapLaw

logger = logging.get_logger(__name__)

CARD_TEMPLATE = "student.md"
PLOT_NAME = "capacity_gap_law.png"
CARD_TAGS = ("distillation", "capacity-gap-law", "hf_capgap")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_WEIGHT_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib")
"""Never uploaded (matched in subfolders too, in any letter case): torch and Python pickles run code
on load, and ``Trainer`` pickles its ``TrainingArguments`` (token included) as ``training_args.bin``
and its optimizer, scheduler and RNG states as ``*.pt`` / ``*.pth``. Pickles under other names are
found by their content (:func:`is_pickle_file`)."""
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 1 << 16


class HubUploadError(HfCapgapError, RuntimeError):
    """The push reached the Hub but did not complete; the local folder is untouched."""


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


@dataclasses.dataclass(frozen=True)
class HeldOutScore:
    """Held-out mean token cross-entropy (nats) and its perplexity."""

    loss: float
    perplexity: float


@dataclasses.dataclass(frozen=True)
class StudentCardInfo:
    """Everything the student card says; ``law`` is ``CapacityGapLaw.to_dict()`` of the law that chose
    the teacher: the card places the pair with that law's own line (``predict``) and prints only its
    parameters, so a card never contradicts ``suggest``.

    ``teacher`` is how the card names the teacher; ``teacher_hub_id`` (a Hub id, never a local path)
    becomes ``base_model`` and the link, and is left out when the teacher is not on the Hub.
    ``license`` None leaves the license for the author to fill in (a student inherits its teacher's
    terms, so no default is assumed). ``repo_id`` is the Hub repo "How to use" loads from.
    ``scratch_eval`` None reports the from-scratch baseline as not run.
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudentCardInfo:
        """Build from plain JSON-like data (nested mappings for the nested records)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown card info field(s) {unknown}; expected only {sorted(known)}.")
        missing = sorted(
            field.name
            for field in dataclasses.fields(cls)
            if field.name not in data
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"card info is missing field(s) {missing}.")
        nested = {"pruning": PruningShape, "training": TrainingSetup}
        nested |= {name: HeldOutScore for name in ("teacher_eval", "pruned_eval", "distilled_eval", "scratch_eval")}
        values = dict(data)
        for name, record in nested.items():
            value = values.get(name)
            if isinstance(value, Mapping):
                try:
                    values[name] = record(**value)
                except TypeError as err:
                    raise ValueError(f"card info field {name!r}: {err}; expected fields of {record.__name__}.") from err
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot make a truthful card."""
        for name in ("teacher_params", "student_params"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive parameter count, got {getattr(self, name)}.")
        if not isinstance(self.law, Mapping):
            raise ValueError(f"law is a {type(self.law).__name__}; pass CapacityGapLaw.to_dict().")
        ci = self.law.get("ratio_ci")
        if ci is not None and (len(ci) != 2 or ci[0] > ci[1]):
            raise ValueError(f"law['ratio_ci'] must be [low, high] with low <= high, or None; got {ci}.")
        law = card_law(self.law)
        if law.ratio <= 0 or (not law.through_origin and law.slope_affine <= 0):
            raise ValueError(f"the law's slope must be positive: {law.formula()}.")
        if not 0 < self.pruning.kept_fraction <= 1:
            raise ValueError(f"pruning.kept_fraction must be in (0, 1], got {self.pruning.kept_fraction}.")
        if not self.eval_dataset:
            raise ValueError("eval_dataset is empty: name the held-out data the losses were measured on.")
        for name in ("teacher_hub_id", "repo_id"):
            value = getattr(self, name)
            if value is not None and (value.count("/") != 1 or value.startswith((".", "/", "~"))):
                raise ValueError(f"{name}={value!r} must be a Hub id 'namespace/name', not a local path.")
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
        raise ValueError(f"law: {err} Pass CapacityGapLaw.to_dict() of the law that chose the teacher.") from err


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
            raise ValueError(f"law_plot {info.law_plot} is not a PNG; save the law plot with format='png'.")
    card = render_model_card(info)
    if plot_bytes is not None:
        atomic_write_bytes(folder / PLOT_NAME, plot_bytes)
    readme = folder / "README.md"
    atomic_write_bytes(readme, str(card).encode("utf-8"))
    return readme


def missing_student_files(folder: Path) -> list[str]:
    """What an exported student folder lacks to be loadable from the Hub with its card."""
    present = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    missing = []
    if "config.json" not in present:
        missing.append("config.json")
    if not {"model.safetensors", "model.safetensors.index.json"} & present:
        missing.append("model.safetensors (or a sharded model.safetensors.index.json)")
    if not {"tokenizer.json", "tokenizer.model"} & present:
        missing.append("tokenizer.json (or tokenizer.model)")
    if "tokenizer_config.json" not in present:
        missing.append("tokenizer_config.json")
    if "README.md" not in present:
        missing.append("README.md")
    return missing


def check_student_folder(folder: str | os.PathLike) -> Path:
    """Refuse a folder that is not a complete, pickle-free exported student."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"student folder {folder} does not exist.")
    pickles = sorted(name for name in _WEIGHT_PICKLES if (folder / name).exists())
    if pickles:
        raise ValueError(f"{folder} holds pickled weights {pickles}; re-save with safetensors and remove them.")
    missing = missing_student_files(folder)
    if missing:
        raise ValueError(
            f"{folder} is not a complete exported student, missing: {', '.join(missing)}. Save the model and "
            "tokenizer with save_pretrained(folder) and write the card with `hf-capgap card FOLDER --info info.json`."
        )
    return folder


def retry_command(
    folder: str | os.PathLike, repo_id: str, *, private: bool, endpoint: str | None, revision: str | None
) -> str:
    """The exact CLI command that repeats a push (the token comes from HF_TOKEN, never the line)."""
    parts = ["hf-capgap", "push", str(folder), repo_id]
    if private:
        parts.append("--private")
    if endpoint is not None:
        parts += ["--endpoint", endpoint]
    if revision is not None:
        parts += ["--revision", revision]
    return shlex.join(parts)


def _refuse_offline() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ValueError(
            "HF_HUB_OFFLINE is set (or TRANSFORMERS_OFFLINE), which blocks every upload, even to a local "
            "endpoint. Unset HF_HUB_OFFLINE to push."
        )


def _scrub(text: str, tokens: Iterable[str]) -> str:
    """``text`` with every form of each token a message may carry (raw, stripped, repr-escaped) masked."""
    for token in tokens:
        for form in sorted({token, token.strip(), repr(token)[1:-1], repr(token.strip())[1:-1]}, key=len, reverse=True):
            if form:
                text = text.replace(form, "***")
    return text


def _matches_pickle_pattern(name: str) -> bool:
    """Whether a relative path has a pickle suffix, in any letter case (``training_args.BIN`` too)."""
    return any(fnmatch.fnmatchcase(name.lower(), pattern) for pattern in PICKLE_PATTERNS)


def _npy_holds_objects(handle: IO[bytes]) -> bool:
    """Whether the ``.npy`` stream at its magic has an object dtype (loading it needs ``allow_pickle``)."""
    head = handle.read(12)
    if len(head) < 10 or not head.startswith(_NPY_MAGIC):
        return False
    major = head[6]
    size, start = (struct.unpack("<H", head[8:10])[0], 10) if major == 1 else (struct.unpack("<I", head[8:12])[0], 12)
    header = head[start:] + handle.read(min(size, _NPY_MAX_HEADER) - len(head[start:]))
    try:
        descr = ast.literal_eval(header.decode("utf-8" if major >= 3 else "latin1"))["descr"]
        return bool(np.lib.format.descr_to_dtype(descr).hasobject)
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError):
        return False


def is_pickle_file(path: str | os.PathLike) -> bool:
    """Whether loading the file may unpickle, told from its first bytes, whatever its name.

    Pickles of protocol 2 and later start with ``\\x80`` and the protocol byte; ``torch.save`` writes a
    zip holding ``*/data.pkl``; an ``.npy`` (or a zip of them, ``.npz``) of dtype object needs
    ``allow_pickle``. Only the header (and a zip's central directory) is read, so weights stay cheap.
    """
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            return True
        if head.startswith(_NPY_MAGIC):
            handle.seek(0)
            return _npy_holds_objects(handle)
        if not head.startswith(_ZIP_MAGIC):
            return False
        try:
            with zipfile.ZipFile(handle) as archive:
                for member in archive.infolist():
                    if member.filename.lower().endswith((".pkl", ".pickle")):
                        return True
                    if member.filename.lower().endswith(".npy"):
                        with archive.open(member) as stream:
                            if _npy_holds_objects(stream):
                                return True
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError):
            return False
    return False


def _files_to_upload(folder: Path) -> tuple[list[str], list[str]]:
    """Relative paths the push will send, and the pickles (by suffix in any case, or by content) it skips."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    sent, skipped = [], []
    for name in filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS):
        is_pickle = _matches_pickle_pattern(name) or is_pickle_file(folder / name)
        (skipped if is_pickle else sent).append(name)
    return sent, skipped


def _holds(path: Path, secret: bytes) -> bool:
    """Whether the file's bytes contain ``secret`` (memory-mapped: weights files can be large)."""
    if path.stat().st_size < len(secret):
        return False
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(secret) != -1


def known_tokens(token: str | None = None) -> list[str]:
    """Every Hub token this machine knows, stripped: ``token``, ``HF_TOKEN`` (and its legacy name), the
    token file, ``get_token()`` and the saved logins.

    A file holding any of them must not be uploaded, not only one holding the token this push sends.
    """
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import get_stored_tokens

    token_file = Path(constants.HF_TOKEN_PATH)
    candidates = [
        token,
        os.environ.get("HF_TOKEN"),
        os.environ.get("HUGGING_FACE_HUB_TOKEN"),
        token_file.read_text(encoding="utf-8") if token_file.is_file() else None,
        get_token(),
        *get_stored_tokens().values(),
    ]
    return sorted({candidate.strip() for candidate in candidates if candidate and candidate.strip()})


def _refuse_token_files(folder: Path, names: Sequence[str], tokens: Sequence[str]) -> None:
    """Refuse, before any request, to upload a file whose bytes contain a known Hub token (never echoed)."""
    secrets = [token.encode("utf-8") for token in tokens]
    holding = [name for name in names if any(_holds(folder / name, secret) for secret in secrets)]
    if holding:
        raise ValueError(
            f"{folder}: {', '.join(holding)} contain(s) a Hub token of this machine (the one for this push, HF_TOKEN "
            "or a saved login); nothing was uploaded. Remove the token from those files (or delete them) and revoke "
            "the token if they were ever shared."
        )


def push_student(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an exported student folder to ``repo_id``, without its pickles; return the commit URL.

    Pickles stay local, a warning naming them: files matching :data:`PICKLE_PATTERNS` in any letter
    case, and files whose first bytes are a pickle, a ``torch.save`` archive or an object ``.npy``
    (``rng_state``, ``.metadata``, ``checkpoint.pth.tar``). A file holding any Hub token this machine
    knows (:func:`known_tokens`) makes the push fail before any request. Creates the repo (and
    ``revision`` as a branch) if needed. Without ``token`` the usual huggingface_hub resolution applies
    (``HF_TOKEN``, then the saved login); an explicit ``token`` is stripped of surrounding whitespace.
    """
    from huggingface_hub import HfApi

    folder = check_student_folder(folder)
    if "/" not in repo_id:
        raise ValueError(f"repo_id {repo_id!r} must be 'namespace/name', e.g. 'my-org/{repo_id}'.")
    _refuse_offline()
    token = (token.strip() or None) if token else None
    tokens = known_tokens(token)
    sent, skipped = _files_to_upload(folder)
    _refuse_token_files(folder, sent, tokens)
    if skipped:
        logger.warning(f"not uploading pickle file(s) {', '.join(skipped)} from {folder}: pickles run code on load.")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Upload distilled student {folder.name} with hf_capgap",
            allow_patterns=[glob.escape(name) for name in sent],
        )
    except Exception as err:
        command = retry_command(folder, repo_id, private=private, endpoint=endpoint, revision=revision)
        raise HubUploadError(
            f"pushing {folder} to {repo_id} failed: {_scrub(str(err), tokens)}\nThe local folder is unchanged. "
            f"Retry with: {command}"
        ) from None
    return commit.commit_url
