"""The public surface: lazy exports and a fast command line."""

from __future__ import annotations

import subprocess
import sys

import hf_capgap
from hf_capgap.cli import build_parser


def test_every_public_name_resolves():
    for name in hf_capgap.__all__:
        assert getattr(hf_capgap, name) is not None


def test_cli_lists_every_command_without_loading_torch():
    code = (
        "import sys; from hf_capgap.cli import build_parser; build_parser().format_help(); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    help_text = build_parser().format_help()
    for command in ("law", "cache", "prune", "push", "card"):
        assert command in help_text
