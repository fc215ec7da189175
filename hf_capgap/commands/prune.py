"""``hf-capgap prune``: cut a student of a given size out of a local teacher checkpoint (MiniMA).

Pruning is a one-process job: the teacher is loaded once, in bf16 on the GPU when there is one
(``hf_capgap.models.teacher_loading``), scored with layer-wise activation checkpointing, and the student is
written with its manifest. A multi-process distillation then starts from that folder
(``recipes/minima.py --student_init OUT``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError, ModelFolderError

CHARS_PER_TOKEN_BOUND = 6  # English BPE rarely packs more characters into one token


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune", help="structurally prune a teacher (heads, MLP neurons, hidden dims, layers) to a target size"
    )
    parser.add_argument("teacher_dir", help="local folder of the teacher (config.json + safetensors + tokenizer)")
    parser.add_argument("--target-params", required=True, help="student size, e.g. 3e9, 3B, 350M, 1200000")
    parser.add_argument("--out", required=True, help="folder to write the student into (must not exist)")
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=16384,
        help="tokens of the embedded corpus for Taylor importance; 0 ranks by weight magnitude instead",
    )
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration rows per backward pass")
    parser.add_argument(
        "--layer-selection",
        choices=("score", "middle"),
        default="score",
        help="drop the least important layers (score) or layers evenly from both ends (middle, as MiniMA)",
    )
    parser.add_argument("--teacher-name", help="name recorded in the manifest (default: TEACHER_DIR's folder name)")
    parser.add_argument(
        "--teacher-dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="dtype the teacher is loaded and scored in (auto: bf16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument(
        "--checkpoint-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute each layer's activations in the scoring backward pass (memory of one layer, not all)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from hf_capgap.law import parse_params
    from hf_capgap.models import check_model_folder, load_frozen_teacher
    from hf_capgap.pruning import (
        prune_model,
        save_pruned,
        shape_for_target,
        shape_params,
    )
    from hf_capgap.pruning.layouts import layout_for, meta_model
    from hf_capgap.utils.processes import launched_processes

    if launched_processes() > 1:
        raise ConfigError(
            f"hf-capgap prune was launched as {launched_processes()} processes; pruning runs in one. Start it with "
            "`hf-capgap prune ...` (no accelerate launch)."
        )
    teacher_dir, out = Path(args.teacher_dir), Path(args.out)
    check_model_folder(teacher_dir, tokenizer=args.calibration_tokens > 0)  # calibration text needs the tokenizer
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} already exists; remove it or pass --overwrite.")
    for flag, value, least in (
        ("--calibration-tokens", args.calibration_tokens, 0),
        ("--seq-len", args.seq_len, 2),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}.")
    config = AutoConfig.from_pretrained(teacher_dir)
    layout_for(config)
    skeleton = meta_model(config)
    shape = shape_for_target(skeleton, round(parse_params(args.target_params)))
    tokenizer = _teacher_tokenizer(teacher_dir, config.vocab_size, needed=args.calibration_tokens > 0)
    calibration = (
        _calibration_batches(tokenizer, args.calibration_tokens, args.seq_len, args.batch_size)
        if args.calibration_tokens > 0
        else None
    )

    teacher = load_frozen_teacher(teacher_dir, teacher_dtype=args.teacher_dtype)
    student = prune_model(
        teacher,
        shape=shape,
        calibration=calibration,
        layer_selection=args.layer_selection,
        checkpoint_layers=args.checkpoint_layers,
    )
    save_pruned(
        student,
        out,
        teacher_name=args.teacher_name or teacher_dir.resolve().name,
        tokenizer=tokenizer,
        overwrite=args.overwrite,
    )
    record = student.pruning_record
    print(
        f"pruned {record.teacher_params:,} -> {record.student_params:,} parameters "
        f"({record.kept_fraction:.1%}; target {shape_params(skeleton, shape):,}) with {record.importance} "
        f"importance on {record.calibration_tokens:,} tokens; shape {record.shape}; wrote {out}"
    )
    return 0


def _teacher_tokenizer(teacher_dir: Path, vocab_size: int, *, needed: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    except (OSError, ValueError) as err:
        if needed:
            raise ModelFolderError(
                f"{teacher_dir} has no loadable tokenizer ({err}); calibration text must be tokenized with "
                "the teacher's tokenizer. Save it into TEACHER_DIR or pass --calibration-tokens 0."
            ) from err
        return None
    if len(tokenizer) > vocab_size:
        raise ModelFolderError(
            f"the tokenizer in {teacher_dir} has {len(tokenizer)} tokens but the teacher's vocab_size is "
            f"{vocab_size}; save the teacher's own tokenizer next to it."
        )
    return tokenizer


def _calibration_batches(tokenizer: Any, tokens: int, seq_len: int, batch_size: int) -> list[dict[str, Any]]:
    """Rows of ``seq_len`` tokens from the embedded train split, about ``tokens`` in all."""
    import importlib

    data = importlib.import_module("hf_capgap.data")
    if not all(hasattr(data, name) for name in ("load_corpus", "tokenize_and_pack", "PASSAGE_CHARS")):
        raise ConfigError(
            "this hf_capgap has no embedded corpus (hf_capgap.data.load_corpus / tokenize_and_pack); "
            "pass --calibration-tokens 0 to rank by weight magnitude."
        )
    train = data.load_corpus()["train"]
    passages = min(len(train), math.ceil(tokens * CHARS_PER_TOKEN_BOUND / data.PASSAGE_CHARS) + 1)
    packed = data.tokenize_and_pack(train.select(range(passages)), tokenizer, seq_len)
    rows = packed.with_format("torch")[: math.ceil(tokens / seq_len)]["input_ids"].long()
    return [{"input_ids": rows[i : i + batch_size]} for i in range(0, len(rows), batch_size)]
