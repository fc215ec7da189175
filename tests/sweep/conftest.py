"""One micro ladder for the sweep's test files: it pretrains in seconds on idle cores, but once is enough."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ladder_dir(tmp_path_factory) -> Path:
    """A fresh micro ladder folder (pretrained by the first sweep that uses it), independent of any cache."""
    return tmp_path_factory.mktemp("ladder") / "micro"
