"""How a photo becomes the model's input, and how a map in the model's frame goes back over the photo.

The input size ``image_size`` is an int S (S x S) or (H_in, W_in). The resize protocol
``resize`` (a detector parameter, saved in the model file) is one of:

* ``stretch`` (the default, and what every model file written before ``resize`` existed used):
  the photo is resized straight to (H_in, W_in); its aspect ratio is not kept.
* ``keep-aspect``: the photo is resized, without distortion, to the largest size that fits in
  (H_in, W_in), centred, and the rest is padded with the input mean (0 after normalisation).
  Why the mean: the backbone's convolutions zero-pad their input, so a zero pad is what the
  network already sees beyond every image border; it adds no colour the network could read as
  content, it is the same on every image (training and test alike, so it is learned as normal),
  and unlike a replicated border it never smears a mark at the photo's edge across the pad.
* ``crop``: the reference implementations' protocol (256 -> 224): the photo is resized to
  (round(H_in / 0.875), round(W_in / 0.875)) and its centre (H_in, W_in) is cropped; a border
  of the photo is not seen by the model.

All three are one :class:`Placement`: the photo resized to ``resized`` = (h_r, w_r), with its
top-left corner at ``offset`` = (top, left) in the model frame (negative: cut away by the crop).
:meth:`Placement.to_photo_frame` inverts it for anomaly maps: a map over the model input becomes
an (h_r, w_r) map over the whole photo.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DefectscopeError

#: the resize protocols, the default first
RESIZE_MODES: tuple[str, ...] = ("stretch", "keep-aspect", "crop")
#: share of each side the ``crop`` protocol keeps (224 of 256, as in the reference implementations)
CROP_FRACTION = 0.875
#: the range of each input side a detector accepts, in pixels
MIN_SIDE, MAX_SIDE = 32, 2048

ImageSize = int | Sequence[int]


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def input_shape(image_size: ImageSize) -> tuple[int, int]:
    """(H_in, W_in) of ``image_size``: an int S gives (S, S), a pair (H, W) gives itself.

    Raises DefectscopeError unless it is a positive whole number or a pair of them.
    """
    if _whole(image_size):
        sides = (int(image_size), int(image_size))  # type: ignore[arg-type]
    elif (
        isinstance(image_size, Sequence)
        and not isinstance(image_size, str)
        and len(image_size) == 2
        and all(_whole(v) for v in image_size)
    ):
        sides = (int(image_size[0]), int(image_size[1]))
    else:
        raise DefectscopeError(f"image_size must be a whole number of pixels or [height, width], got {image_size!r}")
    if min(sides) < 1:
        raise DefectscopeError(f"image size must be a positive number of pixels, got {image_size!r}")
    return sides


def check_image_size(image_size: ImageSize) -> tuple[int, int]:
    """:func:`input_shape`, also requiring each side in [MIN_SIDE, MAX_SIDE] (what a detector accepts)."""
    try:
        h, w = input_shape(image_size)
    except DefectscopeError:
        h = w = 0
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise DefectscopeError(
            f"image_size must be an integer S or [height, width], each between {MIN_SIDE} and "
            f"{MAX_SIDE}, got {image_size!r}"
        )
    return h, w


def check_resize(resize: object) -> str:
    """``resize`` if it names a protocol, else DefectscopeError listing them."""
    if resize not in RESIZE_MODES:
        raise DefectscopeError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    return str(resize)


def size_text(image_size: ImageSize) -> str:
    """The input size as photos are described: ``"WxH"`` (width first), e.g. ``"320x256"``."""
    h, w = input_shape(image_size)
    return f"{w}x{h}"


@dataclass(frozen=True)
class Placement:
    """Where a photo lies in the model input.

    resized: (h_r, w_r) the photo is resized to (it covers the whole photo).
    offset:  (top, left) of the resized photo in the model frame; negative where it is cropped.
    input:   (H_in, W_in), the model input.
    """

    resized: tuple[int, int]
    offset: tuple[int, int]
    input: tuple[int, int]

    @property
    def pad(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) for ``torch.nn.functional.pad`` on the resized photo (negative: crop)."""
        (h_r, w_r), (top, left), (h_in, w_in) = self.resized, self.offset, self.input
        return left, w_in - w_r - left, top, h_in - h_r - top

    def to_photo_frame(self, amap: np.ndarray, fill: float | None = None) -> np.ndarray:
        """(..., H_in, W_in) map over the model input -> (..., h_r, w_r) float32 map over the whole photo.

        stretch: the map itself. keep-aspect: the padding cut away. crop: the map put back in the
        pre-crop frame; the border the crop cut away was never seen, and is filled with the map's
        minimum (per map), so it never reads as anomalous and never outranks a seen pixel, or with
        ``fill`` when given (0 for a region of interest: the unseen border is not judged).
        """
        amap = np.asarray(amap, dtype=np.float32)
        if tuple(amap.shape[-2:]) != self.input:
            raise DefectscopeError(f"expected a map of the model input's shape {self.input}, got {amap.shape[-2:]}")
        (h_r, w_r), (top, left), (h_in, w_in) = self.resized, self.offset, self.input
        if (h_r, w_r) == (h_in, w_in) and (top, left) == (0, 0):
            return amap
        # rows/columns of the photo frame that the model input covers, and where they are in the input
        y0, y1 = max(0, -top), min(h_r, h_in - top)
        x0, x1 = max(0, -left), min(w_r, w_in - left)
        window = amap[..., y0 + top : y1 + top, x0 + left : x1 + left]
        if (y0, y1, x0, x1) == (0, h_r, 0, w_r):
            return np.ascontiguousarray(window)
        out = np.empty((*amap.shape[:-2], h_r, w_r), dtype=np.float32)
        if fill is not None:
            out[...] = fill
        else:
            out[...] = amap.min(axis=(-2, -1), keepdims=True) if amap.size else 0.0
        out[..., y0:y1, x0:x1] = window
        return out


def placement(shape: Sequence[int], image_size: ImageSize, resize: str = "stretch") -> Placement:
    """Where a photo of (H, W) pixels lies in the model input of ``image_size`` under ``resize``."""
    h_in, w_in = input_shape(image_size)
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise DefectscopeError(f"expected an image of at least 1x1 pixels, got {w}x{h}")
    mode = check_resize(resize)
    if mode == "stretch":
        return Placement((h_in, w_in), (0, 0), (h_in, w_in))
    if mode == "keep-aspect":
        scale = min(h_in / h, w_in / w)
        h_r = min(h_in, max(1, round(h * scale)))
        w_r = min(w_in, max(1, round(w * scale)))
        return Placement((h_r, w_r), ((h_in - h_r) // 2, (w_in - w_r) // 2), (h_in, w_in))
    h_r, w_r = round(h_in / CROP_FRACTION), round(w_in / CROP_FRACTION)
    return Placement((h_r, w_r), (-((h_r - h_in) // 2), -((w_r - w_in) // 2)), (h_in, w_in))
