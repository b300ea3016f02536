"""Regions of interest: the part of every photo a model judges.

A region of interest (ROI) is an (H_in, W_in) bool mask over the model input (the canvas, with
tiles). A detector that has one (:meth:`defectscope.detectors.base.Detector.set_roi`) leaves what
lies outside it out of the image score, out of the held-out training scores that set the threshold,
and out of the pixel threshold; its anomaly maps keep their shape and are 0 outside (every method's
map is a distance, so 0 is the lowest value a map can take). See the docs, "Regions of interest".

Where a region comes from (``defectscope fit --roi SPEC``, ``defectscope.fit(..., roi=SPEC)``):

* an **image file** (a mask): pixels at mid-grey or brighter (a grey level of 128 or more of 255,
  the mean of R, G and B; transparent pixels count as black) are judged. Any size: it is mapped onto
  the model input exactly as the photos are (:func:`to_model_input`), so draw it over a photo of the
  line, at that photo's size.
* a **JSON file** (name ending ``.json``) of polygons in photo pixel coordinates::

      {"image_size": [900, 900], "polygons": [[[120, 80], [780, 80], [780, 820], [120, 820]]]}

  ``image_size`` is [width, height] of the photos the coordinates are read on (x to the right, y
  down, from 0 to width and height: coordinates of pixel edges, so pixel (i, j) spans x in [j, j + 1]);
  ``polygons`` is a list of polygons, each a list of at least three [x, y] points; a pixel is in a
  polygon when its centre is (the even-odd rule); the region is the union of the polygons. Nothing
  else is allowed in the file.
* ``"auto"``: the part's region read from the training photos (:func:`auto_roi`): the union of the
  part's silhouette over the training images, holes filled, widened by a margin.

Mapping a photo-frame mask onto the model input (:func:`to_model_input`): the protocol of the photos
(:mod:`defectscope.data.geometry`): resized bilinearly (antialiased) to the placement's size, padded
(keep-aspect: the padding is outside the region) or centre-cropped, then a pixel is inside when at
least half of it is.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.geometry import ImageSize, input_shape, placement, size_text
from ..errors import DefectscopeError, ImageLoadError

log = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "AUTO_IMAGES",
    "AUTO_MARGIN",
    "ROI_TENSOR",
    "auto_roi",
    "check_roi_spec",
    "mask_roi",
    "polygon_roi",
    "resolve_roi",
    "to_model_input",
]

#: the model-file tensor of the region: (H_in, W_in) uint8, 1 inside
ROI_TENSOR = "roi.mask"
#: ``--roi auto``
AUTO = "auto"
#: grey level (of 255) from which a mask pixel is inside the region
MASK_LEVEL = 128
#: ``--roi auto`` reads the silhouettes of at most this many training images (evenly spaced through them)
AUTO_IMAGES = 200
#: ``--roi auto`` widens the union of silhouettes by this share of the model input's longer side
#: (9 px at 288 px: about one PatchCore patch cell), so a defect on the part's outline stays inside
AUTO_MARGIN = 0.03
#: ``--roi auto`` gives up (and judges the whole image) when a part is found in fewer than this share
#: of the training images it reads
AUTO_MIN_FOUND = 0.5
#: the largest photo (pixels) a polygon file's ``image_size`` may give: it is drawn at that size
MAX_POLYGON_PIXELS = 50_000_000
_HINT = "give a mask image (white = judged), a .json file of polygons, or auto"


def check_roi_spec(spec: object) -> str | Path | None:
    """``spec`` as given to ``fit``: None, ``"auto"`` or a path (str or Path); anything else raises
    DefectscopeError. Only the type is checked here; the file is read by :func:`resolve_roi`."""
    if spec is None or (isinstance(spec, str) and spec == AUTO):
        return spec
    if isinstance(spec, (str, Path)) and str(spec).strip():
        return Path(spec)
    raise DefectscopeError(f"roi must be a file path or 'auto', got {spec!r}: {_HINT}")


def to_model_input(mask: np.ndarray, size: ImageSize, resize: str = "stretch") -> np.ndarray:
    """(H, W) bool mask over a photo -> (H_in, W_in) bool mask over the model input of ``size``.

    The photo's own mapping (:func:`defectscope.data.geometry.placement` and
    :func:`defectscope.data.images.preprocess`): resized to the placement's size (bilinear,
    antialiased), padded with "outside" (keep-aspect) or centre-cropped (crop); a model-input pixel
    is inside when the resized mask is at least 0.5 there.
    """
    import torch
    import torch.nn.functional as F

    mask = np.asarray(mask)
    if mask.ndim != 2 or min(mask.shape) < 1:
        raise DefectscopeError(f"expected an (H, W) mask, got shape {mask.shape}")
    place = placement(mask.shape, size, resize)
    x = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(x.shape[-2:]) != place.resized:
        x = F.interpolate(x, size=place.resized, mode="bilinear", align_corners=False, antialias=True)
    if any(place.pad):
        x = F.pad(x, place.pad, value=0.0)
    return np.ascontiguousarray(x[0, 0].numpy() >= 0.5)


def mask_roi(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The (H, W) bool region of a mask image file and its record; DefectscopeError naming the file
    when it is missing, unreadable or has no white pixel."""
    from ..data.images import load_image

    try:
        image = load_image(path)
    except ImageLoadError as exc:
        raise DefectscopeError(f"--roi {exc}: {_HINT}") from None
    inside = image.mean(axis=2) >= MASK_LEVEL
    h, w = inside.shape
    if not inside.any():
        raise DefectscopeError(
            f"--roi {path}: the mask has no white pixel (all {w}x{h} pixels are darker than mid-grey): white marks "
            "the region judged, so this mask would judge nothing"
        )
    return inside, {"kind": "mask", "source": str(path), "source_size": [w, h]}


def polygon_roi(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The (H, W) bool region of a JSON polygon file (format: the module docstring) and its record;
    DefectscopeError naming the file and the bad value for anything else."""
    where = f"--roi {path}"
    if not path.exists():
        raise DefectscopeError(f"{where}: file not found: {_HINT}")
    if path.is_dir():
        raise DefectscopeError(f"{where}: is a folder: {_HINT}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DefectscopeError(f"{where}: cannot be read ({exc})") from None
    if not text.strip():
        raise DefectscopeError(f"{where}: the file is empty; {_EXAMPLE}")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DefectscopeError(
            f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {_EXAMPLE}"
        ) from None
    if not isinstance(spec, dict):
        raise DefectscopeError(f"{where}: expected a JSON object, got {type(spec).__name__}; {_EXAMPLE}")
    unknown = sorted(set(spec) - {"image_size", "polygons"})
    missing = [key for key in ("image_size", "polygons") if key not in spec]
    if unknown or missing:
        what = "; ".join(
            part
            for part in (
                f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else "",
                f"missing {', '.join(map(repr, missing))}" if missing else "",
            )
            if part
        )
        raise DefectscopeError(f"{where}: {what}; {_EXAMPLE}")
    size = spec["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_whole(v) and v >= 1 for v in size)):
        raise DefectscopeError(
            f"{where}: image_size must be [width, height] of the photos, two whole numbers of pixels, got {size!r}"
        )
    w, h = int(size[0]), int(size[1])
    if w * h > MAX_POLYGON_PIXELS:
        raise DefectscopeError(
            f"{where}: image_size {w}x{h} is over {MAX_POLYGON_PIXELS // 1_000_000} megapixels; give the points on a "
            "smaller copy of the photo (the same aspect ratio, any size) and its size"
        )
    polygons = spec["polygons"]
    if not isinstance(polygons, list) or not polygons:
        raise DefectscopeError(f"{where}: polygons must be a non-empty list of polygons, got {polygons!r}")
    inside = np.zeros((h, w), bool)
    for i, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or len(polygon) < 3:
            raise DefectscopeError(
                f"{where}: polygon {i} must be a list of at least 3 [x, y] points, got {_short(polygon)}"
            )
        points: list[tuple[float, float]] = []
        for j, point in enumerate(polygon):
            if not (isinstance(point, list) and len(point) == 2 and all(_number(v) for v in point)):
                raise DefectscopeError(
                    f"{where}: polygon {i}, point {j}: expected [x, y], two finite numbers, got {_short(point)}"
                )
            x, y = float(point[0]), float(point[1])
            if not (0 <= x <= w and 0 <= y <= h):
                raise DefectscopeError(
                    f"{where}: polygon {i}, point {j} ({x:g}, {y:g}) lies outside the {w}x{h} photo given by "
                    "image_size (x in 0..width, y in 0..height, in pixels)"
                )
            points.append((x, y))
        if _area(points) == 0.0:
            raise DefectscopeError(f"{where}: polygon {i} has no area (its points lie on one line)")
        inside |= fill_polygon(points, (h, w))
    return inside, {"kind": "polygons", "source": str(path), "source_size": [w, h], "n_polygons": len(polygons)}


_EXAMPLE = 'expected {"image_size": [width, height], "polygons": [[[x, y], [x, y], [x, y], ...], ...]}'


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _area(points: Sequence[tuple[float, float]]) -> float:
    """The polygon's area by the shoelace formula (absolute value; self-intersections may cancel)."""
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2.0)


def fill_polygon(points: Sequence[tuple[float, float]], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels whose centre (j + 0.5, i + 0.5) lies inside the polygon of ``points``
    ((x, y) in pixel-edge coordinates), by the even-odd rule; one scan line per row."""
    h, w = shape
    xy = np.asarray(points, dtype=np.float64)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    out = np.zeros(shape, bool)
    top, bottom = max(0, int(np.floor(xy[:, 1].min()))), min(h, int(np.ceil(xy[:, 1].max())) + 1)
    centres = np.arange(w) + 0.5
    for row in range(top, bottom):
        y = row + 0.5
        crossing = (np.minimum(y0, y1) <= y) & (y < np.maximum(y0, y1))  # half-open: a vertex counts once
        if not crossing.any():
            continue
        xs = x0[crossing] + (y - y0[crossing]) * (x1[crossing] - x0[crossing]) / (y1[crossing] - y0[crossing])
        out[row] = (xs[None, :] < centres[:, None]).sum(axis=1) % 2 == 1
    return out


def fill_holes(part: np.ndarray) -> np.ndarray:
    """(H, W) 0/1 -> (H, W) bool: every region's outer outline, filled (holes inside become part of it)."""
    import cv2

    contours, _ = cv2.findContours(part.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(part.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def auto_roi(
    paths: Sequence[Path],
    size: ImageSize,
    resize: str = "stretch",
    *,
    transform: Callable[[np.ndarray], tuple[np.ndarray, Any]] | None = None,
    margin: float = AUTO_MARGIN,
    max_images: int = AUTO_IMAGES,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """``--roi auto``: the region where the part lies in the training photos.

    For at most ``max_images`` training images (evenly spaced through ``paths``; each warped first by
    ``transform``, the fit's aligner, so the region is in the frame the model sees): the part's
    silhouette (:func:`defectscope.components.align.part_silhouette`: Otsu's threshold, the background
    on the border's side, the largest component), its holes filled (a dark print or a bore inside the
    outline stays in), mapped onto the model input as the photo is. The region is the union over the
    images, widened by ``margin`` x the input's longer side (an elliptical dilation) and its holes filled.

    Returns (the (H_in, W_in) bool region, its record), or (None, a record saying why) when a part was
    found in fewer than :data:`AUTO_MIN_FOUND` of the images read (a surface filling the frame, a
    background that is not uniform): the whole image is then judged. Unreadable files are skipped here
    (the fit reports them).
    """
    import cv2

    from ..data.images import load_image
    from .align import part_silhouette

    shape = input_shape(size)
    paths = list(paths)
    picks = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), max_images)).round().astype(int))
    count = np.zeros(shape, np.int32)
    n_read = n_found = 0
    for i in picks.tolist():
        try:
            image = load_image(paths[i])
        except ImageLoadError:
            continue
        n_read += 1
        if transform is not None:
            image, _ = transform(image)
        part = part_silhouette(image)
        if part is None:
            continue
        n_found += 1
        count += to_model_input(fill_holes(part), shape, resize)
    radius = max(0, round(margin * max(shape)))
    record: dict[str, Any] = {
        "kind": AUTO,
        "rule": (
            "union of the part's silhouette (Otsu threshold, background on the border's side, largest component, "
            f"holes filled) over the training images, widened by {radius} px"
        ),
        "n_images": n_read,
        "n_found": n_found,
        "margin_px": radius,
    }
    if n_read == 0 or n_found < AUTO_MIN_FOUND * n_read:
        record["applied"] = False
        record["reason"] = (
            f"no part found against a uniform background in {n_read - n_found} of {n_read} training images "
            "(a surface filling the frame, or a background that is not uniform): the whole image is judged"
        )
        return None, record
    union = (count > 0).astype(np.uint8)
    if radius:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        region = fill_holes(cv2.dilate(union, kernel))
    else:
        region = fill_holes(union)
    record["applied"] = True
    return region, record


def resolve_roi(
    spec: str | Path | None,
    size: ImageSize,
    resize: str = "stretch",
    *,
    paths: Sequence[Path] = (),
    transform: Callable[[np.ndarray], tuple[np.ndarray, Any]] | None = None,
    margin: float = AUTO_MARGIN,
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The region a fit uses: (the (H_in, W_in) bool mask over the model input of ``size``, the record
    stored in the model's metadata as ``roi``), or (None, None) without ``spec``.

    ``spec``: a mask image, a ``.json`` polygon file or ``"auto"`` (the module docstring); ``paths``,
    ``transform`` and ``margin`` are the training images, the fit's aligner and the widening, for
    ``"auto"`` (:func:`auto_roi`; it may return (None, record) when it finds no part). Raises DefectscopeError, naming the file and what to do,
    for a missing or unreadable file, a mask with no white pixel, a malformed polygon file, or a region
    that covers no pixel of the model input. ``share`` in the record is the fraction of the model
    input inside the region.
    """
    spec = check_roi_spec(spec)
    if spec is None:
        return None, None
    if spec == AUTO:
        region, record = auto_roi(paths, size, resize, transform=transform, margin=margin)
    else:
        path = Path(spec)
        photo, record = polygon_roi(path) if path.suffix.lower() == ".json" else mask_roi(path)
        region = to_model_input(photo, size, resize)
        if not region.any():
            w, h = record["source_size"]
            raise DefectscopeError(
                f"--roi {path}: the region ({int(photo.sum())} of {w}x{h} pixels) covers no pixel of the "
                f"{size_text(size)} model input once resized as the photos are: make it larger"
            )
    if region is not None:
        record["share"] = round(float(region.mean()), 4)
        record["input_size"] = list(input_shape(size))
        record["outside"] = "left out of the image score and the thresholds; anomaly map 0"
    return region, record
