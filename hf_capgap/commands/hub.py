"""``hf-capgap push`` (upload an exported student) and ``hf-capgap card`` (write its README.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_capgap.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    push = subparsers.add_parser("push", help="Upload an exported student folder to the Hugging Face Hub.")
    push.add_argument("folder", help="exported student: config.json, safetensors, tokenizer, README.md")
    push.add_argument("repo_id", help="target repository, 'namespace/name'")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    push.add_argument(
        "--token", default=None, help="write token; prefer the HF_TOKEN environment variable (not in shell history)"
    )
    push.set_defaults(handler=_push)

    card = subparsers.add_parser("card", help="Render the student's model card (README.md) from a JSON of facts.")
    card.add_argument("folder", help="exported student folder to write README.md (and the law plot) into")
    card.add_argument("--info", required=True, help="JSON file with the StudentCardInfo fields")
    card.set_defaults(handler=_card)


def _push(args: argparse.Namespace) -> int:
    from hf_capgap.hub import push_student

    # Only --token is passed: huggingface_hub resolves HF_TOKEN and the saved login itself (stripped).
    url = push_student(
        args.folder,
        args.repo_id,
        token=args.token,
        private=args.private,
        endpoint=args.endpoint,
        revision=args.revision,
    )
    print(url)
    return 0


def _card(args: argparse.Namespace) -> int:
    from hf_capgap.hub import write_model_card

    info_path = Path(args.info)
    if not info_path.is_file():
        raise FileNotFoundError(f"--info {info_path} does not exist; write the card facts as JSON first.")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--info {info_path} is not valid JSON: {err}") from err
    print(write_model_card(args.folder, info))
    return 0
