"""Per-channel input normalisation: the ImageNet statistics or the backbone weights' own.

Every backbone here was pre-trained on ImageNet, but not every one with ImageNet's mean/std:
the EfficientNet-Lite weights were trained on inputs scaled to [-1, 1] (mean = std = 0.5).
``"weights"`` keeps the statistics the weights were trained with. The defaults were decided on
the development suite's mean (README, "Accuracy beyond bottle"), not on bottle alone: PatchCore
uses the weights' own statistics (image AUROC higher on every set but bottle, where both give
1.0), PaDiM and SPADE ImageNet's (PaDiM's image AUROC mean is higher with them).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DefectscopeError

Stats = tuple[float, float, float]

IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)

#: accepted values of the detectors' ``normalization`` parameter
NORMALIZATIONS: tuple[str, ...] = ("imagenet", "weights")
DEFAULT_NORMALIZATION = "imagenet"
#: PatchCore's default (see the module docstring)
PATCHCORE_NORMALIZATION = "weights"
#: what model files written before the parameter existed used
LEGACY_NORMALIZATION = "weights"


def check_normalization(value: object) -> str:
    """``value`` if it is a known normalisation name, else a DefectscopeError listing the choices."""
    if value not in NORMALIZATIONS:
        raise DefectscopeError(f"unknown normalization {value!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    return str(value)


def input_stats(normalization: str, weights_mean: Sequence[float], weights_std: Sequence[float]) -> tuple[Stats, Stats]:
    """(mean, std) per RGB channel for ``normalization``, given the weights' own statistics."""
    if check_normalization(normalization) == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = tuple(float(v) for v in weights_mean), tuple(float(v) for v in weights_std)
    return mean, std  # type: ignore[return-value]
