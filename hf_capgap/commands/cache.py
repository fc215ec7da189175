"""``hf-capgap cache``: build a teacher cache once, then check or describe it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_capgap.errors import ConfigError, ModelFolderError


class _DeferredArgumentsParser(argparse.ArgumentParser):
    """A parser that adds part of its arguments only once it parses (or prints its help): ``cache build``
    takes trl.SFTConfig's data flags, whose import (trl, torch) would slow the start of every command."""

    def __init__(self, *args: Any, deferred: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deferred = deferred

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            deferred(self)
        return super().parse_known_args(args, namespace)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="build, verify or describe a teacher cache")
    actions = parser.add_subparsers(dest="cache_command", required=True, parser_class=_DeferredArgumentsParser)

    build = actions.add_parser(
        "build", help="run a teacher over a dataset and store its signal", deferred=_add_preparation_arguments
    )
    build.add_argument("teacher", help="folder of the teacher (save_pretrained of a causal LM, with its tokenizer)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset",
        help="save_to_disk folder of a dataset: text, messages, prompt-completion or tokenized input_ids",
    )
    source.add_argument("--corpus", choices=["embedded"], help="tokenize and pack the corpus shipped with hf_capgap")
    build.add_argument("--split", default="train", help="split to cache when the dataset has several")
    build.add_argument("--seq-len", type=int, default=128, help="row length when packing --corpus")
    build.add_argument("--out", required=True, help="cache folder to write (a rerun resumes it)")
    build.add_argument(
        "--mode", choices=["topk", "sampled", "dense"], default="topk", help="what to keep per position"
    )
    build.add_argument("--k", type=int, default=64, help="top-k entries, or draws (<= 255), per position")
    build.add_argument(
        "--bytes-per-token",
        type=float,
        help="sampled mode: instead of --k, the most draws whose signal of the first 4,096 labelled positions "
        "fits this many bytes per position",
    )
    build.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the teacher")
    build.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="storage of log-probs")
    build.add_argument(
        "--batch-size", type=int, default=8,
        help="rows per teacher forward, halved on out-of-memory errors: a large one finds the largest that fits",
    )  # fmt: skip
    build.add_argument("--shard-tokens", type=int, default=262144, help="tokens per shard file")
    build.add_argument("--seed", type=int, default=0, help="seed of the sampled mode")
    build.add_argument(
        "--sampler",
        choices=["systematic", "multinomial"],
        default="systematic",
        help="sampled mode: evenly spaced draws from one random offset (systematic), or independent draws",
    )
    build.add_argument(
        "--teacher-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype the teacher runs in (auto: bfloat16 on a GPU, float32 on a CPU)",
    )
    build.add_argument("--device", help="device of the teacher (default: cuda if available, else cpu)")
    build.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    build.set_defaults(handler=_build)

    verify = actions.add_parser("verify", help="check every shard of a cache against its manifest checksums")
    verify.add_argument("path", help="cache folder")
    verify.set_defaults(handler=_verify)

    info = actions.add_parser("info", help="print what a cache holds and how it was made")
    info.add_argument("path", help="cache folder")
    info.set_defaults(handler=_info)


def _add_preparation_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's data settings, as trl.SFTConfig declares them (HfArgumentParser's flags)."""
    import dataclasses

    from transformers import HfArgumentParser

    from hf_capgap.data import PREPARATION_ARGUMENTS
    from hf_capgap.trainer import DistillationConfig

    group = parser.add_argument_group(
        "data preparation",
        "trl.SFTConfig fields that shape the cached rows: give the trainer's values (a trainer whose config "
        "disagrees is refused)",
    )
    fields = {field.name: field for field in dataclasses.fields(DistillationConfig)}
    for name in PREPARATION_ARGUMENTS:
        HfArgumentParser._parse_dataclass_field(group, fields[name])
    for action in group._group_actions:
        if action.dest == "max_length":
            action.type = _int_or_none  # HfArgumentParser parses Optional[int] as int: None is SFTConfig's "no limit"
            action.help = f"{action.help} 'None': no limit (padding_free without packing needs it)"
    group.add_argument(
        "--data_seed", type=int, default=fields["seed"].default,
        help="SFTConfig.seed, the seed shuffle_dataset shuffles the rows with (--seed is the sampled mode's)",
    )  # fmt: skip


def _int_or_none(value: str) -> int | None:
    """An int, or None for 'None' (as SFTConfig's max_length takes)."""
    return None if value.lower() == "none" else int(value)


def _load_dataset(args: argparse.Namespace, tokenizer: object) -> object:
    import datasets

    if args.corpus:
        from hf_capgap.data import load_corpus, tokenize_and_pack

        if tokenizer is None:
            raise ModelFolderError(f"--corpus embedded needs the teacher's tokenizer, but {args.teacher} has none.")
        corpus = load_corpus()
        if args.split not in corpus:
            raise ConfigError(f"--split {args.split!r} is not in the corpus; use one of {list(corpus)}.")
        return tokenize_and_pack(corpus[args.split], tokenizer, args.seq_len)
    loaded = datasets.load_from_disk(args.dataset)
    if isinstance(loaded, datasets.DatasetDict):
        if args.split not in loaded:
            raise ConfigError(f"--split {args.split!r} is not in {args.dataset}; use one of {list(loaded)}.")
        return loaded[args.split]
    return loaded


def _build(args: argparse.Namespace) -> int:
    from hf_capgap.models import check_model_folder

    teacher_dir = Path(args.teacher)
    # Token-id datasets need no tokenizer; the corpus does, and a folder that ships tokenizer files must
    # ship a loadable one (its vocabulary), since the build then records the tokenizer's eos and template.
    has_tokenizer = any((teacher_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    check_model_folder(teacher_dir, tokenizer=bool(args.corpus) or has_tokenizer)
    if args.dataset and not Path(args.dataset).is_dir():
        raise FileNotFoundError(f"--dataset {args.dataset} is not a folder; pass a save_to_disk folder.")

    from transformers import AutoTokenizer

    from hf_capgap.cache import TeacherCache
    from hf_capgap.data import PREPARATION_ARGUMENTS
    from hf_capgap.models import load_frozen_teacher
    from hf_capgap.trainer.config import default_preparation_args

    preparation = default_preparation_args(
        **{name: getattr(args, name) for name in PREPARATION_ARGUMENTS}, seed=args.data_seed
    )
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir) if has_tokenizer else None
    dataset = _load_dataset(args, tokenizer)
    teacher = load_frozen_teacher(teacher_dir, teacher_dtype=args.teacher_dtype, device=args.device)
    cache = TeacherCache.build(
        teacher,
        dataset,
        args.out,
        mode=args.mode,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        shard_tokens=args.shard_tokens,
        tokenizer=tokenizer,
        args=preparation,
        dtype=args.dtype,
        seed=args.seed,
        sampler=args.sampler,
        bytes_per_token=args.bytes_per_token,
        overwrite=args.overwrite,
    )
    print(f"wrote {cache!r}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from hf_capgap.cache import TeacherCache

    cache = TeacherCache.load(args.path, verify=True)
    print(f"ok: {len(cache.manifest['shards'])} shards, {len(cache)} sequences match the manifest of {args.path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from hf_capgap.cache import TeacherCache

    cache = TeacherCache.load(args.path)
    m = cache.manifest
    rows = [
        ("mode", m["mode"] if m.get("sampler") is None else f"{m['mode']} ({m['sampler']} draws)"),
        ("k", m["k"]),
        ("temperature", m["temperature"]),
        (
            "storage",
            f"ids {'as varint-coded gaps' if m['mode'] == 'sampled' else m['id_dtype']}, "
            f"log-probs {m['value_storage']}",
        ),
        ("vocabulary", f"{m['real_vocab_size']} real tokens {m['vocabulary_fingerprint'] or ''}".rstrip()),
        ("sequences", m["num_sequences"]),
        ("tokens", f"{m['num_tokens']} ({m['num_positions']} labelled positions)"),
        ("shards", len(m["shards"])),
        ("bytes/token", f"{cache.bytes_per_token:.1f}"),
        ("teacher", f"{m['teacher_name'] or '(unnamed)'} {m['teacher_dtype']} {m['teacher_fingerprint']}"),
        ("dataset", m["dataset_fingerprint"]),
        (
            "prepared with",
            ", ".join(f"{name}={value}" for name, value in m["preparation"].items())
            if "preparation" in m
            else "(not recorded: built by an older hf_capgap)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
