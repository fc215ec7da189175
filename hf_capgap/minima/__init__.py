"""The MiniMA recipe as stages: config, plan, data, teacher, prune, distill, evaluate, export,
dry_run; ``run_minima`` runs them in order and resumes. Importing this package loads no torch.
"""

from __future__ import annotations

from hf_capgap.minima.run import MinimaConfig, Plan, build_config, make_plan, parse_minima_args, run_minima

__all__ = [
    "MinimaConfig",
    "Plan",
    "build_config",
    "make_plan",
    "parse_minima_args",
    "run_minima",
]
