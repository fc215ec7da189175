"""Pushing an exported student to the Hub without its pickles.

The upload is the exported folder less its pickles, found by name and by content
(``training_args.bin``, optimizer and RNG states, pickled weights: they execute code when loaded and
``training_args.bin`` holds the Hub token and local paths): it is checked for completeness, and for
files holding any Hub token of this machine, before any request, and the token only ever travels in
headers.
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import mmap
import os
import pickletools
import shlex
import struct
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from transformers.utils import logging

from hf_capgap.errors import ConfigError, HfCapgapError

logger = logging.get_logger(__name__)

_WEIGHT_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
PICKLE_PATTERNS = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "*.ckpt",
    "*.joblib",
    "*.pkl.*",
    "*.pickle.*",
    "*.joblib.*",
)
"""Never uploaded (matched in subfolders too, in any letter case): torch and Python pickles run code
on load, and ``Trainer`` pickles its ``TrainingArguments`` (token included) as ``training_args.bin``
and its optimizer, scheduler and RNG states as ``*.pt`` / ``*.pth``. Pickles under other names are
found by their content (:func:`is_pickle_file`); compressed pickles (``*.pkl.gz``) by their suffix."""
_PICKLE_OPCODES = frozenset(opcode.code.encode("latin1") for opcode in pickletools.opcodes)
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 1 << 16


class HubUploadError(HfCapgapError, RuntimeError):
    """The push reached the Hub but did not complete; the local folder is untouched."""


def missing_student_files(folder: Path) -> list[str]:
    """What an exported student folder lacks to be loadable from the Hub with its card."""
    return _missing_from({path.name for path in folder.iterdir()} if folder.is_dir() else set())


def _missing_from(present: set[str]) -> list[str]:
    """What a set of top-level file names lacks to make a loadable student with its card."""
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
        raise ConfigError(f"{folder} holds pickled weights {pickles}; re-save with safetensors and remove them.")
    missing = missing_student_files(folder)
    if missing:
        raise ConfigError(
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
        raise ConfigError(
            "HF_HUB_OFFLINE is set (or TRANSFORMERS_OFFLINE), which blocks every upload, even to a local "
            "endpoint. Unset HF_HUB_OFFLINE to push."
        )


def _scrub(text: str, tokens: Iterable[str]) -> str:
    """``text`` with every form of each token a message may carry (raw, stripped, repr-escaped) masked."""
    for token in tokens:
        forms = {token, token.strip(), repr(token)[1:-1], repr(token.strip())[1:-1]}
        for form in sorted(forms, key=len, reverse=True):
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


def _is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file starts like safetensors: a little-endian header length that fits, then its JSON."""
    return len(head) == 9 and 8 + struct.unpack("<Q", head[:8])[0] <= size and head[8:9] == b"{"


def is_pickle_file(path: str | os.PathLike) -> bool:
    """Whether loading the file may unpickle, told from its first bytes, whatever its name.

    Pickles of protocol 2 and later start with ``\\x80``, the protocol byte and an opcode; ``torch.save``
    writes a zip holding ``*/data.pkl``; an ``.npy`` (or a zip of them, ``.npz``) of dtype object needs
    ``allow_pickle``. A safetensors file is recognised first: its 8-byte header length can begin with
    the same two bytes as a pickle. Only the header (and a zip's central directory) is read, so weights
    stay cheap.
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
        if _is_safetensors(head, os.fstat(handle.fileno()).st_size):
            return False
        if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2:3] in _PICKLE_OPCODES:
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
    token file, the saved logins and, when no ``token`` is given, ``get_token()``.

    A file holding any of them must not be uploaded, not only one holding the token this push sends.
    ``get_token()`` is left out beside an explicit token: with ``HF_OIDC_RESOURCE`` set it exchanges
    an OIDC token over the network (or raises), for a token this push would not send.
    """
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import get_stored_tokens

    token_file = Path(constants.HF_TOKEN_PATH)
    candidates = [
        token,
        *_environment_tokens(),
        token_file.read_text(encoding="utf-8") if token_file.is_file() else None,
        *get_stored_tokens().values(),
    ]
    if token is None:
        candidates.append(get_token())
    return sorted({candidate.strip() for candidate in candidates if candidate and candidate.strip()})


def _environment_tokens() -> list[str | None]:
    return [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]


def _gather_tokens(token: str | None) -> list[str]:
    """:func:`known_tokens`, with a failure (an OIDC exchange, an unreadable login) as a scrubbed HubUploadError."""
    try:
        return known_tokens(token)
    except Exception as err:
        secrets = [secret for secret in (token, *_environment_tokens()) if secret]
        raise HubUploadError(
            f"could not read the Hub tokens of this machine: {_scrub(str(err), secrets)}; nothing was uploaded. "
            "Pass --token (or HF_TOKEN), or fix the login named above."
        ) from None


def _refuse_token_files(folder: Path, names: Sequence[str], tokens: Sequence[str]) -> None:
    """Refuse, before any request, to upload a file whose bytes contain a known Hub token (never echoed)."""
    secrets = [token.encode("utf-8") for token in tokens]
    holding = [name for name in names if any(_holds(folder / name, secret) for secret in secrets)]
    if holding:
        raise ConfigError(
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
    (an OIDC exchange where ``HF_OIDC_RESOURCE`` is set, ``HF_TOKEN``, then the saved login); an
    explicit ``token`` is sent as is, stripped of surrounding whitespace, with no OIDC exchange.
    """
    from huggingface_hub import HfApi

    folder = check_student_folder(folder)
    if "/" not in repo_id:
        raise ConfigError(f"repo_id {repo_id!r} must be 'namespace/name', e.g. 'my-org/{repo_id}'.")
    _refuse_offline()
    token = (token.strip() or None) if token else None
    tokens = _gather_tokens(token)
    sent, skipped = _files_to_upload(folder)
    unsent = _missing_from({name for name in sent if "/" not in name})
    if unsent:
        raise ConfigError(
            f"{folder}: the push would leave out {', '.join(unsent)} (skipped as pickle(s): "
            f"{', '.join(skipped) or 'none'}); nothing was uploaded. Re-save the student with save_pretrained."
        )
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
