"""Read image and mask files robustly and turn images into normalised model input.

Every file goes through :func:`_open`, which decodes it fully (so truncation is caught
here, not later) and applies the EXIF orientation. Any problem with a file becomes an
:class:`~defectscope.errors.ImageLoadError` whose one-line message is ``"<path>: <problem>"``.

Conversion to 8-bit RGB (:func:`load_image`):

* grayscale, palette, CMYK, YCbCr, LAB, HSV and 1-bit images are converted to RGB;
* images with transparency (RGBA, LA, PA, palette with a transparent colour) are
  composited over black: ``rgb * alpha / 255``, so fully transparent pixels become black;
* 16-bit (and other integer) single-channel images are scaled by their declared bit depth
  (``v * 255 / (2**bits - 1)``): a 16-bit 65535 becomes 255 and a 12-bit value stored in a
  16-bit file stays dark, it is not stretched or clipped;
* float images (``F``, e.g. float TIFF) in [0, 1] are scaled by 255; any other range is
  min-max stretched to [0, 255]; NaN becomes 0;
* multi-frame files (TIFF stacks, animated GIF/PNG) give their first frame.

:func:`load_image_noting` says when a rule drops content (frames after the first, transparent
pixels), so the front ends can tell the user once per file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DefectscopeError, ImageLoadError
from .geometry import ImageSize, placement

if TYPE_CHECKING:  # torch loads in preprocess only: exported models read images without it
    import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".bmp",
    ".dib",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".pgm",
    ".ppm",
    ".pbm",
    ".pnm",
    ".pfm",
    ".tga",
    ".jp2",
    ".j2k",
    ".jpx",
    ".j2c",
    ".pcx",
    ".sgi",
    ".rgb",
    ".qoi",
    ".dds",
    ".icns",
    ".ico",
    ".im",
    ".ras",
    ".xbm",
    ".psd",
)
"""File name endings treated as images (compared case-insensitively): the raster formats Pillow
decodes (``python -c "from PIL import features; features.pilinfo()"`` lists them), without the
ones it needs outside programs for (EPS) or cannot read back (PDF)."""

_WARNED_MASKS: set[str] = set()
#: a mask with more distinct values than this (and values above mid-level) is binarised at mid-level
NOISY_MASK_VALUES = 16
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_TIFF_BITS_PER_SAMPLE = 258


def _open(path: str | Path) -> Image.Image:
    """Open, fully decode and EXIF-orient the first frame of ``path``; raise ImageLoadError."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{path}: file is empty (0 bytes)")
        img = Image.open(path)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file (cannot identify format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{path}: image is too large to decode safely ({exc})") from None
    except PermissionError:
        raise ImageLoadError(f"{path}: permission denied") from None
    except OSError as exc:  # Pillow reports broken headers as OSError from open()
        raise ImageLoadError(f"{path}: image data is truncated or corrupt: {_first_line(exc)}") from None
    try:
        with img:
            return first_frame(img)
    except DECODE_ERRORS as exc:
        raise ImageLoadError(f"{path}: image data is truncated or corrupt: {_first_line(exc)}") from None


#: what Pillow raises while decoding damaged data
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError)


def first_frame(img: Image.Image) -> Image.Image:
    """The fully decoded, EXIF-oriented first frame of an opened image, carrying in its ``info`` what
    the RGB rules need: the bit depth the file declares and the number of frames it has. Every way an
    image enters defectscope (a file, an upload to ``serve``) goes through here, so a file scores the
    same however it arrives. Raises :data:`DECODE_ERRORS` for damaged data."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        img.seek(0)
    img.load()  # force the full decode so truncated/corrupt data is caught here
    bits = _declared_bits(img)
    oriented = ImageOps.exif_transpose(img)
    oriented = oriented if oriented is not None else img.copy()
    if bits is not None:
        oriented.info["defectscope_bits"] = bits
    if frames > 1:
        oriented.info["defectscope_frames"] = frames
    return oriented


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _declared_bits(img: Image.Image) -> int | None:
    """Bits per sample the file declares for integer single-channel modes, else None."""
    if img.mode.startswith("I;16"):
        return 16
    if img.mode != "I":
        return None
    tags = getattr(img, "tag_v2", None)
    if tags is not None and _TIFF_BITS_PER_SAMPLE in tags:
        value = tags[_TIFF_BITS_PER_SAMPLE]
        return int(value[0] if isinstance(value, tuple) else value)
    if img.format == "PNG":  # PNG integer images are 16-bit
        return 16
    return None


def _to_rgb_uint8(img: Image.Image, path: str | Path, notes: list[str] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB array from any PIL mode (see the module docstring for the rules).

    ``notes`` collects what of the file's content was not used as it is (see :func:`load_image_noting`)."""
    frames = img.info.get("defectscope_frames")
    if notes is not None and frames:
        notes.append(f"has {frames} frames: only the first is used")
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(img, dtype=np.float64), notes))
    if mode == "I" or mode.startswith("I;"):
        arr = np.asarray(img).astype(np.float64)
        bits = img.info.get("defectscope_bits")
        if bits is None:  # undeclared: the smallest common depth that holds the data
            peak = float(arr.max()) if arr.size else 0.0
            bits = next(b for b in (8, 16, 32) if peak < 2**b)
        scaled = np.clip(arr, 0, None) * (255.0 / (2 ** int(bits) - 1))
        return _gray_to_rgb(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4]
        if notes is not None and bool((alpha < 255).any()):
            share = float((alpha < 255).mean())
            notes.append(
                f"has transparent pixels ({share:.0%} of the image): composited over black, so they "
                "count as black (save the photo without transparency to avoid it)"
            )
        rgb = rgba[..., :3] * (alpha / 255.0)  # composite over black
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"{path}: cannot convert colour mode {mode!r} to RGB ({exc})") from None


def _float_to_uint8(arr: np.ndarray, notes: list[str] | None = None) -> np.ndarray:
    """float -> uint8: [0, 1] data is scaled by 255, anything else min-max stretched; NaN and +-inf become 0.

    ``notes`` collects a phrase when either rule changed the data (a bad frame must not pass unnoticed)."""
    bad = ~np.isfinite(arr)
    if bad.any() and notes is not None:
        notes.append(f"has {int(bad.sum())} NaN or infinite value(s) ({bad.mean():.0%} of the values): set to 0")
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    if lo < 0.0 or hi > 1.0:
        if notes is not None:
            notes.append(
                f"has float values outside [0, 1] ({lo:.6g} to {hi:.6g}): the whole image was stretched "
                "from its minimum to its maximum, so one stray value changes every pixel (give values in "
                "[0, 1], or uint8/uint16)"
            )
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3) by repeating the channel."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def load_image(path: str | Path) -> np.ndarray:
    """Read any supported image file as an (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Raises ImageLoadError ("<path>: <problem>") for a missing, empty, truncated, corrupt or
    non-image file.
    """
    return _to_rgb_uint8(_open(path), path)


def load_image_noting(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """:func:`load_image`, plus one note per part of the file's content that is not used as it is:
    frames after the first, transparency composited over black. Each note is a phrase to follow
    the path (``"<path>: has 3 frames: only the first is used"``)."""
    notes: list[str] = []
    return _to_rgb_uint8(_open(path), path, notes), notes


def to_rgb_uint8(image: object, name: str = "image", notes: list[str] | None = None) -> np.ndarray:
    """An in-memory image as an (H, W, 3) uint8 RGB array, by the same rules as image files.

    Accepts a PIL image (any mode) or a numpy array (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4)
    RGBA, of dtype bool, uint8, uint16 (scaled by 65535), uint32/uint64 (scaled by the smallest common
    bit depth that holds the data) or float ([0, 1] scaled by 255, any other range min-max stretched,
    NaN -> 0). Signed integer arrays are refused (their range is ambiguous: convert them first). Raises
    ImageLoadError ``"<name>: <problem>"`` for anything else. ``notes`` collects what was not used as
    given (transparency composited over black, NaN values, a stretched float range), as for files.
    """
    if isinstance(image, Image.Image):
        try:
            image.load()
        except (OSError, ValueError) as exc:
            raise ImageLoadError(f"{name}: image data is truncated or corrupt: {_first_line(exc)}") from None
        return _to_rgb_uint8(image, name, notes)
    if not isinstance(image, np.ndarray):
        raise ImageLoadError(f"{name}: expected a file path, a PIL image or a numpy array, got {type(image).__name__}")
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageLoadError(
            f"{name}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageLoadError(f"{name}: the array is empty ({arr.shape})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.kind == "f":
        out = _float_to_uint8(arr.astype(np.float64), notes)
    elif arr.dtype.kind == "u":
        if arr.dtype == np.uint8:
            out = arr
        else:
            peak = int(arr.max())
            bits = 16 if arr.dtype == np.uint16 else next(b for b in (8, 16, 32, 64) if peak < 2**b)
            out = np.clip(np.rint(arr.astype(np.float64) * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    elif arr.dtype.kind == "i":
        raise ImageLoadError(
            f"{name}: signed integer arrays ({arr.dtype}) are ambiguous (0-255 data or a 16-bit "
            "range?): convert to uint8 (0-255), uint16 (0-65535) or float (0-1) first"
        )
    else:
        raise ImageLoadError(f"{name}: unsupported array dtype {arr.dtype} (use uint8, uint16 or float)")
    if out.ndim == 2:
        return _gray_to_rgb(out)
    if out.shape[2] == 4:  # composite over black, as for files with transparency
        if notes is not None and bool((out[..., 3] < 255).any()):
            notes.append(
                f"has transparent pixels ({float((out[..., 3] < 255).mean()):.0%} of the image): composited "
                "over black, so they count as black"
            )
        alpha = out[..., 3:4].astype(np.float32) / 255.0
        return np.clip(np.rint(out[..., :3].astype(np.float32) * alpha), 0, 255).astype(np.uint8)
    return np.array(out[..., :3], dtype=np.uint8, order="C")  # a copy: the caller's array is never shared


def load_mask(
    path: str | Path,
    size: tuple[int, int] | None = None,
    *,
    image: str | Path | None = None,
    image_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a ground-truth mask as an (H, W) bool array.

    Defect pixels: any non-zero value (a defect value of 1, 236 or 255, a few class ids), unless the
    mask holds more than 16 distinct values reaching above mid-level (a JPEG-compressed mask, an
    antialiased drawing): such a mask is binarised at mid-level (128 of 255, half the range of 16-bit) with a
    warning naming the file: counting every non-zero value there turns compression noise into defects.
    Grayscale, RGB (a pixel is taken at its brightest channel), palette and 16-bit masks are accepted;
    an alpha channel is ignored. ``image_shape=(H, W)`` is the photo's shape (after EXIF orientation):
    a mask of another shape raises ImageLoadError naming the mask and ``image``. ``size=(h, w)``
    resizes with nearest-neighbour interpolation.
    """
    img = _open(path)
    if img.mode == "P":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        colour = arr[..., :3] if img.mode in ("RGBA", "RGBa", "RGBX") else arr
        if img.mode in ("LA", "La"):
            colour = arr[..., :1]
        arr = colour.max(axis=2)
    if image_shape is not None and tuple(arr.shape[:2]) != tuple(image_shape):
        raise ImageLoadError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} pixels but its image {image or ''} is "
            f"{image_shape[1]}x{image_shape[0]}: masks must have their image's shape (a stretched mask changes "
            "pixel AUROC and AUPRO)"
        )
    mid = 128 if arr.dtype == np.uint8 else (2 ** (8 * arr.dtype.itemsize - 1) if arr.dtype.kind in "ui" else 0.5)
    values = np.unique(arr)
    if values.size > NOISY_MASK_VALUES and values[-1] >= mid:
        if str(path) not in _WARNED_MASKS:  # once per file, however often it is read
            _WARNED_MASKS.add(str(path))
            log.warning(
                "%s: mask holds %d different values (compression noise or soft edges?): binarised at %s",
                path,
                values.size,
                mid,
            )
        mask = arr >= mid
    else:
        mask = arr != 0
    if size is not None:
        h, w = int(size[0]), int(size[1])
        if mask.shape != (h, w):
            small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
            mask = np.asarray(small) > 0
    return np.ascontiguousarray(mask, dtype=bool)


def preprocess(
    image: np.ndarray, size: ImageSize, mean: Sequence[float], std: Sequence[float], resize: str = "stretch"
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H_in, W_in) float32 model input; ``size`` is S or (H_in, W_in).

    Resized (bilinear, antialiased) as the ``resize`` protocol says (:mod:`defectscope.data.geometry`:
    stretch, keep-aspect or crop), scaled to [0, 1], normalised per channel: (x - mean) / std,
    then padded with 0 (keep-aspect) or centre-cropped (crop) to the input size.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DefectscopeError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    place = placement(image.shape[:2], size, resize)
    if len(mean) != 3 or len(std) != 3:
        raise DefectscopeError(f"mean and std need 3 values (R, G, B), got {list(mean)} and {list(std)}")
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    if x.shape[-2:] != place.resized:
        x = F.interpolate(x, size=place.resized, mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - m) / s
    if any(place.pad):
        x = F.pad(x, place.pad, value=0.0)  # 0 = the input mean; negative widths crop
    return x.squeeze(0).contiguous()
