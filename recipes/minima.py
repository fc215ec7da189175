"""MiniMA end to end: pick the student size by the law of capacity gap, prune, distil, evaluate, export.

    accelerate launch recipes/minima.py [CONFIG.yaml] [--key value ...]
    python recipes/minima.py --help               # every setting, with its help
    python recipes/minima.py CONFIG.yaml --dry_run --accelerate_config recipes/accelerate/fsdp.yaml

No CONFIG: the tiny preset (recipes/configs/minima_tiny.yaml), offline on a CPU. Keys are the fields
of ``hf_capgap.minima.config.MinimaConfig``; ``--key value`` pairs override the YAML. A rerun resumes
an interrupted run, or reprints a finished one. A multi-process launch starts from ``--student_init``
(pruning is a one-process stage: ``--prune_only`` first).
"""

from __future__ import annotations

import logging
import sys

from hf_capgap.errors import HfCapgapError
from hf_capgap.minima import parse_minima_args, run_minima
from hf_capgap.utils.processes import end_processes


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(message)s")  # hf_capgap's progress (INFO and up) on stderr, as bare lines
    logging.getLogger("hf_capgap").setLevel(logging.INFO)
    try:
        run_minima(parse_minima_args(sys.argv[1:] if argv is None else argv), show=print)
    except (HfCapgapError, ValueError, FileNotFoundError) as err:  # bad config (before any work), a failed push
        sys.exit(f"minima: {err}")
    end_processes()  # only after success: a failed process must not wait in a barrier for the others


if __name__ == "__main__":
    main()
