"""What every dataset layout produces: labelled samples with optional masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One test image.

    path: the image file.
    label: 0 = good, 1 = defective.
    defect_type: "good" for good images, else the defect folder/type name.
    mask_path: ground-truth mask (non-zero = defect), or None (good image, or no mask given).
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass(frozen=True)
class Split:
    """A category ready to fit and evaluate: good training images and labelled test samples."""

    name: str
    train: list[Path]
    test: list[Sample]
