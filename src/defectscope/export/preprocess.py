"""Model input for exported models, without torch: resize to S x S and scale to [0, 1].

The torch path (:func:`defectscope.data.images.preprocess`) resizes the [0, 1] float image with
``F.interpolate(..., mode="bilinear", antialias=True)``. Torch's antialiased bilinear is Pillow's
resampling algorithm (a triangle filter widened by the reduction factor, weights normalised per
output pixel), so Pillow resizing each channel as a 32-bit float image (mode ``"F"``) gives the
same numbers: measured on bottle (900 px) and pill (800 px) test images, at most 3e-7 apart at
256 and 128 px and 7e-6 at 224 px, where torch computes its filter weights in float32. Pillow's
8-bit resize is not an option: it rounds to whole grey levels (up to 0.004 apart), enough to move
scores by more than 1e-4.

The normalisation (mean, std) is inside the exported graph, so the input here stays in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import DefectscopeError

__all__ = ["prepare", "resize_unit"]


def resize_unit(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32 in [0, 1], resized as the torch path does."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DefectscopeError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if size < 1:
        raise DefectscopeError(f"image size must be a positive number of pixels, got {size}")
    unit = image.astype(np.float32) / np.float32(255.0)
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(unit.transpose(2, 0, 1))
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(unit[:, :, c])).resize((size, size), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
        for c in range(3)
    ]
    return np.stack(channels)


def prepare(image: np.ndarray, size: int, mean: Sequence[float] = (), std: Sequence[float] = ()) -> np.ndarray:
    """The loader's hook (:func:`defectscope.data.loader.iter_batches` ``prepare``): (3, S, S) float32
    in [0, 1]. ``mean`` and ``std`` are accepted and not used: the graph normalises."""
    return resize_unit(image, size)
