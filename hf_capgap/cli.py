"""The ``hf-capgap`` command line.

Each sub-command lives in ``hf_capgap/commands/<name>.py`` and exposes ``register(subparsers)``;
those modules import only argparse at module level so ``hf-capgap --help`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("law", "cache", "prune", "hub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-capgap", description="Distill language models along the law of capacity gap."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"hf_capgap.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error hf_capgap raises (or a bad value, a missing file) is printed as one line.

    Exit 2 when the input is at fault (a ``ValueError``, a missing file), 1 when a library step failed
    on its own (a Hub upload the server broke off): a script can tell "fix the command" from "retry".
    """
    from hf_capgap.errors import HfCapgapError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (HfCapgapError, ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split("\n"))
        print(f"hf-capgap {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, FileNotFoundError)) else 1


if __name__ == "__main__":
    sys.exit(main())
