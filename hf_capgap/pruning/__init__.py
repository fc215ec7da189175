"""Prune a teacher into a student of a given shape (width and depth, importance-scored), as a pure
model transform, and save it with a manifest.
"""

from __future__ import annotations

from hf_capgap.pruning.prune import (
    FORMAT_VERSION,
    LAYER_SELECTIONS,
    MANIFEST_KIND,
    TARGET_TOLERANCE,
    PruneSelection,
    PruneShape,
    PruningRecord,
    apply_selection,
    prune_model,
    pruned_config,
    save_pruned,
    select_units,
    shape_for_target,
    shape_params,
)

__all__ = [
    "MANIFEST_KIND",
    "FORMAT_VERSION",
    "TARGET_TOLERANCE",
    "LAYER_SELECTIONS",
    "PruneSelection",
    "PruneShape",
    "PruningRecord",
    "apply_selection",
    "prune_model",
    "pruned_config",
    "save_pruned",
    "select_units",
    "shape_for_target",
    "shape_params",
]
