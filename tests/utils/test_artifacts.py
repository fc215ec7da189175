"""Atomic artifact writes: what they publish gets the usual modes under the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from hf_capgap.pruning import prune_model, save_pruned
from hf_capgap.utils.artifacts import (
    MANIFEST_NAME,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    write_manifest,
)
from tests.conftest import tiny_llama


@pytest.fixture
def umask():
    """Set the process umask for one test and restore the previous one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_get_the_modes_of_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    atomic_write_bytes(tmp_path / "card.md", b"card")
    atomic_write_json(tmp_path / "results.json", {"loss": 1.0})
    atomic_write_json(tmp_path / "results.json", {"loss": 0.5})  # replacing keeps the umask's mode too
    assert mode(tmp_path / "card.md") == mode(tmp_path / "results.json") == file_mode

    final = tmp_path / "run"
    for overwrite in (False, True):
        with atomic_directory(final, overwrite=overwrite) as tmp:
            (tmp / "weights.bin").write_bytes(b"w")
            write_manifest(tmp, "test", 1, {})
        assert mode(final) == dir_mode
        assert mode(final / MANIFEST_NAME) == mode(final / "weights.bin") == file_mode
    assert sorted(path.name for path in tmp_path.iterdir()) == ["card.md", "results.json", "run"]


def test_a_pruned_student_is_readable_by_group_and_others_under_umask_022(tmp_path, umask):
    teacher = tiny_llama(layers=2)
    calibration = [{"input_ids": torch.randint(0, 96, (2, 8))}]
    target = sum(p.numel() for p in teacher.parameters()) // 2
    student = prune_model(teacher, target_params=target, calibration=calibration)
    folder = save_pruned(student, tmp_path / "pruned", teacher_name="tiny")
    assert mode(folder) == 0o755
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert {"model.safetensors", "config.json", MANIFEST_NAME} <= {path.name for path in files}
    assert {path.name: mode(path) for path in files} == {path.name: 0o644 for path in files}


def test_a_setgid_parent_makes_published_folders_setgid_but_never_a_file(tmp_path, umask):
    umask(0o002)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    if not shared.stat().st_mode & stat.S_ISGID:
        pytest.skip("this filesystem does not keep the setgid bit on folders")
    with atomic_directory(shared / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "run.sh").write_text("#!/bin/sh\nid\n")
        os.chmod(tmp / "run.sh", 0o755)
        (tmp / "weights.safetensors").write_bytes(b"w")
    assert (shared / "out" / "sub").stat().st_mode & stat.S_ISGID
    assert stat.S_IMODE((shared / "out" / "run.sh").stat().st_mode) == 0o775
    assert stat.S_IMODE((shared / "out" / "weights.safetensors").stat().st_mode) == 0o664


def test_rewriting_an_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    private = tmp_path / "private.json"
    private.write_text("{}")
    os.chmod(private, 0o600)
    atomic_write_json(private, {"a": 1})
    assert mode(private) == 0o600 and private.read_text().startswith("{")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another group needs root or membership of it")
def test_rewriting_a_group_shared_file_keeps_its_group(tmp_path):
    shared = tmp_path / "README.md"
    shared.write_text("old")
    os.chown(shared, -1, 4321)
    os.chmod(shared, 0o640)
    atomic_write_bytes(shared, b"new")
    assert shared.stat().st_gid == 4321 and mode(shared) == 0o640 and shared.read_bytes() == b"new"


def test_rewriting_through_a_symlink_rewrites_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "cards" / "README.md"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "README.md"
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
