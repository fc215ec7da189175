"""Pretrain every missing teacher of a ladder preset (resumable; finished teachers are reused).

    python recipes/pretrain.py recipes/configs/pretrain_tiny.yaml [--key value ...]
    python recipes/pretrain.py --help            # every key, with its help

Keys are the fields of ``hf_capgap.ladder.pretraining.LadderRun`` (preset, output_dir, cache_dir, num_proc)
and of ``PretrainSettings``; ``--key value`` pairs override the YAML.
"""

from __future__ import annotations

import logging
import sys

from hf_capgap.errors import HfCapgapError
from hf_capgap.ladder import TEACHER_FORMAT_VERSION, TEACHER_KIND, LadderRun, PretrainSettings, ensure_ladder
from hf_capgap.utils.artifacts import read_manifest
from hf_capgap.utils.recipe_args import parse_with_preset, read_preset, split_preset


def parse_config(argv: list[str]) -> tuple[LadderRun, PretrainSettings]:
    types = [LadderRun, PretrainSettings]
    preset, overrides = split_preset(argv)
    values = {} if preset is None else read_preset(preset, types)
    run, settings = parse_with_preset(types, values, overrides, description=__doc__)
    return run, settings


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(message)s")  # hf_capgap's progress (INFO and up) on stderr, as bare lines
    logging.getLogger("hf_capgap").setLevel(logging.INFO)
    try:
        run, settings = parse_config(sys.argv[1:] if argv is None else argv)
    except (HfCapgapError, ValueError, FileNotFoundError) as err:
        sys.exit(f"pretrain: {err}")
    paths = ensure_ladder(
        run.preset, run.output_dir, settings=settings, cache_dir=run.cache_dir, num_proc=run.num_proc
    )
    print(f"{'teacher':<14}{'params':>11}{'tokens':>11}{'wall s':>9}{'val loss':>10}")
    for path in paths:
        manifest = read_manifest(path, TEACHER_KIND, TEACHER_FORMAT_VERSION)
        print(
            f"{manifest['name']:<14}{manifest['params']:>11,}{manifest['tokens_seen']:>11,}"
            f"{manifest['wall_seconds']:>9}{manifest['final_validation_loss']:>10.4f}"
        )


if __name__ == "__main__":
    main()
