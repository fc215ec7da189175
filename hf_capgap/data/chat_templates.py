"""Chat templates as ``trl.SFTTrainer`` applies them (``chat_template_path``, ``eos_token``), and the
template and eos a trainer would render rows with, so a cache records and checks them."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from hf_capgap.data.formats import DatasetFormatError


def _is_template_file(path: str) -> bool:
    """Whether SFTTrainer reads ``chat_template_path`` as a template file rather than a tokenizer to clone."""
    return os.path.isfile(path) and path.endswith((".jinja", ".j2"))


def apply_chat_template_path(processing_class: Any, args: Any) -> None:
    """Give the tokenizer ``args.chat_template_path``'s template, as ``SFTTrainer.__init__`` does
    (trl/trainer/sft_trainer.py, right after ``eos_token``) before it prepares rows.

    A ``.jinja`` / ``.j2`` file is read as the template. Any other path is a tokenizer TRL's
    ``clone_chat_template`` copies the template from, adding its tokens to the tokenizer and resizing the
    model: that would resize the teacher, so it is refused here with the way to do it first.
    """
    path = args.chat_template_path
    if path is None:
        return
    if not _is_template_file(path):
        raise DatasetFormatError(
            f"chat_template_path={path!r} is not a .jinja/.j2 file, so SFTTrainer would clone a tokenizer's template "
            "onto the model, adding tokens and resizing its embeddings. Apply trl.clone_chat_template(teacher, "
            "tokenizer, path) yourself and build with chat_template_path=None, or pass a .jinja file."
        )
    with open(path, encoding="utf-8") as template:
        processing_class.chat_template = template.read()


def template_digest(template: str | dict[str, str] | None) -> str | None:
    """A short sha256 of a chat template (a string, or a dict of named templates)."""
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trainer_chat_template(tokenizer: Any, args: Any) -> str | dict[str, str] | None:
    """The template a trainer with ``args`` and ``tokenizer`` renders chats with, once SFTTrainer has
    applied ``chat_template_path``; None when unknown (no tokenizer, and no template file)."""
    path = args.chat_template_path
    if path is not None and _is_template_file(path):
        with open(path, encoding="utf-8") as template:
            return template.read()
    if path is not None:
        return _clone_source(path).get_chat_template()
    return None if tokenizer is None else getattr(tokenizer, "chat_template", None)


def trainer_eos_token(tokenizer: Any, args: Any) -> str | None:
    """The eos SFTTrainer appends to text rows with ``args`` and ``tokenizer``: ``eos_token``, else the
    tokenizer's, and a cloned template's source tokenizer's over both; None when unknown."""
    path = args.chat_template_path
    if path is not None and not _is_template_file(path):
        return _clone_source(path).eos_token  # clone_chat_template sets it after eos_token
    if args.eos_token is not None:
        return args.eos_token
    return None if tokenizer is None else getattr(tokenizer, "eos_token", None)


def _clone_source(path: str) -> Any:
    """The tokenizer ``clone_chat_template`` copies from (it loads it the same way)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
