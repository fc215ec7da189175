"""Atomic artifact writing and manifests.

Every artifact hf_capgap writes (teacher caches, pruned students, pretrained teachers, sweep results)
lands in a directory that appears only once complete, next to a ``capgap_manifest.json`` recording
what produced it. Loading re-reads the manifest and refuses stale or foreign artifacts by name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hf_capgap.errors import HfCapgapError

MANIFEST_NAME = "capgap_manifest.json"


class ArtifactError(HfCapgapError, ValueError):
    """An artifact on disk is missing, incomplete, corrupted or was made from different inputs."""


def _package_version() -> str:
    from hf_capgap import __version__

    return __version__


def temporary_prefix(name: str) -> str:
    """How the temporary files and folders of an atomic write of ``name`` begin (a kill mid-write leaves one)."""
    return f".{name}."


def _create_temporary(parent: Path, name: str, suffix: str, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    """Create a new, uniquely named temporary of ``name`` in ``parent`` with ``create`` (exclusive).

    ``tempfile.mkstemp`` / ``mkdtemp`` would make it 0600 / 0700 whatever the umask, and the rename
    keeps that mode: published folders and files must get the usual modes under the user's umask.
    """
    for _ in range(100):
        path = parent / f"{temporary_prefix(name)}{secrets.token_hex(4)}{suffix}"
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary for {parent / name}: 100 names were taken.")


def _open_new_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def _make_directory(path: Path) -> None:
    os.mkdir(path, 0o777)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The file ends up as a plain ``open`` would leave it: a new one gets 0666 less the umask; an
    existing one keeps its mode and group (a user's 0600 stays private, a group-shared 0640 stays
    readable to its group), and a symlink keeps pointing at the file, which is what gets rewritten.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temporary(path.parent, path.name, ".tmp", _open_new_file)
    try:
        with os.fdopen(fd, "wb") as handle:
            _keep_mode_and_group(handle.fileno(), path)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _keep_mode_and_group(fd: int, existing: Path) -> None:
    """Give the new file behind ``fd`` the mode and group of ``existing``, if there is one.

    Changing the group needs membership of it; a user who may not keeps the default group.
    """
    try:
        status = os.stat(existing)
    except FileNotFoundError:
        return
    os.fchmod(fd, status.st_mode & 0o777)
    with contextlib.suppress(PermissionError):
        os.fchown(fd, -1, status.st_gid)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``final`` only if the block succeeds.

    A crash or exception leaves no trace at ``final``: the temporary directory is removed. What is
    published gets the modes of the umask (folders 0777, files 0666, less the umask), whatever the
    writer chose: safetensors, for one, writes its files 0600, unreadable to colleagues.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists; remove it or pass overwrite=True.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _create_temporary(final.parent, final.name, ".tmp", _make_directory)
    try:
        yield tmp
        _apply_umask_modes(tmp)
        if final.exists():
            trash, _ = _create_temporary(final.parent, final.name, ".old", _make_directory)
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask_modes(root: Path) -> None:
    """Give every folder and file under ``root`` the mode a plain mkdir / open would (executables stay so).

    ``root`` was made by ``os.mkdir(root, 0o777)``, so its own mode is 0777 less the umask: reading
    it avoids ``os.umask``'s set-and-restore, which briefly changes the umask of every thread. In a
    setgid parent that mode carries the setgid bit, right for folders but never for a file (a setgid
    executable runs with the folder's group), so files keep only the permission bits.
    """
    folder_mode = stat.S_IMODE(root.stat().st_mode)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, folder_mode)
        else:
            executable = path.stat().st_mode & stat.S_IXUSR
            os.chmod(path, folder_mode & (0o777 if executable else 0o666))


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(
    directory: str | os.PathLike,
    kind: str,
    format_version: int,
    fields: Mapping[str, Any],
    *,
    checksum_files: bool = True,
) -> dict[str, Any]:
    """Write ``capgap_manifest.json`` into ``directory``, with a sha256 of every file in it."""
    directory = Path(directory)
    manifest: dict[str, Any] = {
        "kind": kind,
        "format_version": format_version,
        "hf_capgap_version": _package_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
    if checksum_files:
        manifest["files"] = {
            str(p.relative_to(directory)): file_sha256(p)
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
        }
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(
    directory: str | os.PathLike,
    kind: str,
    format_version: int,
    *,
    expected: Mapping[str, Any] | None = None,
    verify_files: bool = False,
) -> dict[str, Any]:
    """Load and check a manifest; raise :class:`ArtifactError` naming the first problem found.

    ``expected`` maps manifest fields to the values the caller is about to rely on (fingerprints of
    the teacher, tokenizer, dataset ...); a ``None`` value skips that field.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{directory} has no {MANIFEST_NAME}: it is not a complete hf_capgap {kind} "
            "(an interrupted write, or a folder made by something else). Rebuild it."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); rebuild the {kind}.") from err
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a {manifest.get('kind')!r}, not a {kind!r}.")
    if manifest.get("format_version") != format_version:
        raise ArtifactError(
            f"{directory}: {kind} format_version is {manifest.get('format_version')}, this hf_capgap "
            f"reads {format_version}; rebuild it with this version."
        )
    for field, want in (expected or {}).items():
        if want is None:
            continue
        have = manifest.get(field)
        if have != want:
            raise ArtifactError(
                f"{directory}: manifest field {field!r} is {have!r} but the caller has {want!r}; the "
                f"{kind} was built from different inputs. Rebuild it for these inputs."
            )
    if verify_files:
        verify_manifest_files(directory, manifest)
    return manifest


def verify_manifest_files(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    directory = Path(directory)
    for name, digest in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; rebuild the artifact.")
        if file_sha256(path) != digest:
            raise ArtifactError(f"{path} does not match its manifest checksum (corrupted or modified).")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token ids: the vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload: Any = json.loads(backend.to_str())
        payload.pop("truncation", None)
        payload.pop("padding", None)
    else:
        payload = sorted(tokenizer.get_vocab().items())
    return json_sha256({"tokenizer": payload, "special": tokenizer.all_special_tokens})


def model_fingerprint(model: Any) -> str:
    """Hash of a model's architecture config and every weight (order-independent of device/dtype views).

    A model sharded across ranks (FSDP2 / tensor-parallel DTensors, DeepSpeed ZeRO-3) hashes its
    whole weights, gathered one at a time, so it equals the unsharded model's: every rank must call it.
    """
    import torch

    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in sorted(model.state_dict().items()):
        with _whole(tensor, parameters.get(name)) as whole:
            digest.update(name.encode())
            digest.update(str(whole.dtype).encode())
            data = whole.detach().to("cpu").contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _whole(tensor: Any, parameter: Any) -> Iterator[Any]:
    """A state-dict entry as one full tensor, gathered from the ranks where it is sharded."""
    from torch.distributed.tensor import DTensor

    if hasattr(parameter, "ds_id"):  # ZeRO-3: the state dict holds an empty placeholder
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            yield parameter.data
    else:
        yield tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


_FINGERPRINT_BATCH_ROWS = 4096
_content_fingerprints: dict[str, str] = {}


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of a ``datasets.Dataset``'s rows and features: equal rows give equal values anywhere.

    ``Dataset._fingerprint`` cannot serve: it also hashes where the source files lay, so the same
    corpus loaded from two checkouts looks like two datasets and every stored artifact turns "stale".
    The content hash is memoised per ``_fingerprint`` because it reads every row once.
    """
    import datasets
    import pyarrow as pa

    if not isinstance(dataset, datasets.Dataset):
        raise ArtifactError(
            f"dataset is a {type(dataset).__name__}; pass a datasets.Dataset (not a list or torch Dataset)."
        )
    memo_key = dataset._fingerprint
    if memo_key in _content_fingerprints:
        return _content_fingerprints[memo_key]
    digest = hashlib.sha256(json.dumps(dataset.features.to_dict(), sort_keys=True).encode())
    digest.update(str(len(dataset)).encode())
    # Fixed-size batches, copied by ``take`` into fresh buffers (a slice of a larger table keeps the
    # parent's buffers and offsets), then serialised with IPC: the bytes depend on the rows only.
    for batch in dataset.with_format("arrow").iter(batch_size=_FINGERPRINT_BATCH_ROWS):
        compact = batch.take(pa.array(range(batch.num_rows), type=pa.int64())).combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, compact.schema.remove_metadata()) as writer:
            writer.write_table(compact)
        digest.update(memoryview(sink.getvalue()))
    fingerprint = digest.hexdigest()[:16]
    _content_fingerprints[memo_key] = fingerprint
    return fingerprint
