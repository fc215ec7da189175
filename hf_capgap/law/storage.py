"""The law as JSON: ``law.json`` written by ``CapacityGapLaw.save``, read back by ``CapacityGapLaw.load``."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_capgap.errors import ConfigError
from hf_capgap.law.fit import CONFIDENCE, INTERVAL_METHOD, CapacityGapWarning, Optimum, fit_fields
from hf_capgap.utils.artifacts import ArtifactError

if TYPE_CHECKING:
    from hf_capgap.law.law import CapacityGapLaw

FORMAT_VERSION = 1
KIND = "capacity_gap_law"


def law_to_dict(law: CapacityGapLaw) -> dict[str, Any]:
    """Everything needed to rebuild the law (and to describe it on a model card), JSON-able."""
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "ratio": law.ratio,
        "ratio_ci": None if law.ratio_ci is None else list(law.ratio_ci),
        "confidence": CONFIDENCE if law.ratio_ci is not None else None,
        "through_origin": law.through_origin,
        "slope_affine": law.slope_affine,
        "intercept": law.intercept,
        "r2": law.r2,
        "r2_affine": law.r2_affine,
        "source": law.source,
        "families": list(law.families),
        "citation": law.citation,
        "n_students": sum(optimum.interior for optimum in law.optima),
        "optima": [{**asdict(optimum), "points_used": list(optimum.points_used)} for optimum in law.optima],
        "bootstrap": None
        if law.band_draws is None
        else {
            "resampled": "student sizes (cases)",
            "interval": "expanded percentile",
            "method": law.interval_method,
            "percentiles": list(law.band_percentiles),
            "n": law.n_bootstrap,
            "seed": law.seed,
            "draws": law.band_draws.tolist(),
        },
        "records": law.records,
    }


def law_fields(data: Any) -> dict[str, Any]:
    """The constructor arguments of a law saved by :func:`law_to_dict`; ArtifactError naming what is wrong."""
    if not isinstance(data, Mapping):
        raise ArtifactError(f"a law is a JSON object, not a {type(data).__name__}; refit the law.")
    if data.get("kind") != KIND:
        raise ArtifactError(f"this is a {data.get('kind')!r}, not a {KIND!r}.")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"law format_version is {data.get('format_version')!r}, this hf_capgap reads "
            f"{FORMAT_VERSION}; refit it with `hf-capgap law fit` from its ledger."
        )
    try:
        return _fields(data)
    except KeyError as err:
        raise ArtifactError(f"the law lacks the field {err}; refit it with `hf-capgap law fit`.") from err


def _fields(data: Mapping[str, Any]) -> dict[str, Any]:
    bootstrap = data["bootstrap"]
    return dict(
        ratio=data["ratio"],
        ratio_ci=data["ratio_ci"],
        source=data["source"],
        through_origin=data["through_origin"],
        slope_affine=data["slope_affine"],
        intercept=data["intercept"],
        r2=data["r2"],
        r2_affine=data["r2_affine"],
        optima=[Optimum(**{**o, "points_used": tuple(o["points_used"])}) for o in data["optima"]],
        records=data["records"],
        families=data["families"],
        band_draws=None if bootstrap is None else np.asarray(bootstrap["draws"], dtype=float),
        band_percentiles=None if bootstrap is None else tuple(bootstrap["percentiles"]),
        n_bootstrap=None if bootstrap is None else bootstrap["n"],
        seed=None if bootstrap is None else bootstrap["seed"],
        interval_method=INTERVAL_METHOD if bootstrap is None else bootstrap.get("method", 1),
    )


def recompute_interval(law: CapacityGapLaw, bootstrap: Mapping[str, Any], where: str) -> None:
    """Replace an interval saved by an earlier method with this one's, refitted from the stored records.

    The fit is seeded with the stored ``seed`` and ``n``, so loading gives the same interval each
    time; without records (or if they no longer fit) the stored interval is kept, with a warning, and
    the law keeps the stored method, so saving it again does not label the old interval as new.
    """
    method = bootstrap.get("method", 1)
    try:
        if not law.records:
            raise ConfigError("the file stores no records")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CapacityGapWarning)
            refit = fit_fields(
                law.records, n_bootstrap=bootstrap["n"], seed=bootstrap["seed"], through_origin=law.through_origin
            )
    except (ValueError, KeyError, TypeError) as err:
        warnings.warn(
            f"{where} was saved with interval method {method!r} (this hf_capgap uses {INTERVAL_METHOD}), whose "
            f"interval can be too narrow (zero-width with two student sizes), and it cannot be recomputed: {err}. "
            "Its interval is kept as saved; refit the law with `hf-capgap law fit` from its ledger.",
            CapacityGapWarning,
            stacklevel=4,
        )
        return
    law.ratio_ci = refit["ratio_ci"]
    law.band_draws, law.band_percentiles = refit["band_draws"], refit["band_percentiles"]
    law.n_bootstrap, law.seed = refit["n_bootstrap"], refit["seed"]
    law.interval_method = INTERVAL_METHOD
    warnings.warn(
        f"{where} was saved with interval method {method!r} (this hf_capgap uses {INTERVAL_METHOD}); its interval "
        f"was recomputed from its {len(law.records)} stored records (n_bootstrap={refit['n_bootstrap']}, "
        f"seed={refit['seed']}). Save the law again to store the recomputed interval.",
        CapacityGapWarning,
        stacklevel=4,
    )


def read_law_file(path: Path) -> Any:
    """The JSON a law file holds; FileNotFoundError or ArtifactError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"no law file at {path}; write one with `hf-capgap law fit`.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); refit the law.") from err
    return data
