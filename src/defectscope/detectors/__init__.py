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
        raise DefectscopeError(
            f"{method} does not take parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    return cls(**params)


__all__ = ["Detector", "Prediction", "METHODS", "detector_class", "make_detector"]
