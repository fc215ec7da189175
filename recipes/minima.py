"""MiniMA end to end: pick the student size by the law of capacity gap, prune, distil, evaluate, export.

    accelerate launch recipes/minima.py [CONFIG.yaml] [--key value ...]
    python recipes/minima.py                      # recipes/configs/minima_tiny.yaml, offline on a CPU

Keys are the fields of ``hf_capgap.minima.MinimaConfig`` (each documents itself); ``--key value``
pairs override the YAML. A rerun resumes an interrupted run, or reprints a finished one.
"""

from __future__ import annotations

import sys

from hf_capgap.minima import load_config, run_minima
from hf_capgap.processes import end_processes


def main(argv: list[str] | None = None) -> None:
    try:
        run_minima(load_config(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError) as err:  # config errors, raised before any work starts
        sys.exit(f"minima: {err}")
    end_processes()  # only after success: a failed process must not wait in a barrier for the others


if __name__ == "__main__":
    main()
