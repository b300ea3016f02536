"""The detectors, by method name."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import DefectscopeError
from .base import Detector, Prediction

# method name -> "module:Class", imported on first use
METHODS: dict[str, str] = {
    "patchcore": "defectscope.detectors.patchcore:PatchCore",
    "padim": "defectscope.detectors.padim:PaDiM",
    "spade": "defectscope.detectors.spade:SPADE",
}


#: parameters added after model files and benchmark cells existed, each at the value that reproduces the
#: earlier computation: a model file without one loads with this value (io.py), and a benchmark cell's key
#: leaves it out at this value (layer_weighting: no longer PatchCore's default, but what came before it)
NEUTRAL_PARAMS: dict[str, Any] = {
    "resize": "stretch",
    "rotations": 1,
    "border_padding": "zeros",
    "layer_weighting": "channels",
    "score_patches": 1,
}


def comparable_params(full: dict[str, Any]) -> dict[str, Any]:
    """``full`` (a detector's ``get_params()``) without the parameters at their :data:`NEUTRAL_PARAMS` value,
    and without ``tile_overlap`` when there are no tiles: two settings that compute the same get the same
    dict, whichever version wrote them. Benchmark cells are keyed on it, so an upgrade that adds a
    parameter does not recompute them."""
    out = {k: v for k, v in full.items() if not (k in NEUTRAL_PARAMS and v == NEUTRAL_PARAMS[k])}
    if out.get("tiles") == 1:  # no tiling: the overlap means nothing
        out.pop("tiles", None)
        out.pop("tile_overlap", None)
    return out


def detector_class(method: str) -> type[Detector]:
    """The detector class for a method name; unknown names list the valid ones."""
    try:
        target = METHODS[method]
    except KeyError:
        raise DefectscopeError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}") from None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def make_detector(method: str, **params: Any) -> Detector:
    """Build an unfitted detector; unknown parameters are reported, not swallowed."""
    cls = detector_class(method)
    valid = cls._param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise DefectscopeError(f"{method} does not take parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return cls(**params)


__all__ = [
    "METHODS",
    "NEUTRAL_PARAMS",
    "Detector",
    "Prediction",
    "comparable_params",
    "detector_class",
    "make_detector",
]
