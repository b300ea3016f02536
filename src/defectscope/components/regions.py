"""Connected regions of an anomaly map: the blob analysis machine-vision tools judge parts by.

A region is an 8-connected set of map pixels at or above a level (8-connectivity, as
:func:`defectscope.evaluation.metrics.aupro` labels defects, and as MVTec's ``compute_pro``).
Three numbers per map, all pure numpy/scipy/numba (no torch: an exported model's runtime uses them):

* :func:`region_level`: the highest level ``t`` at which some region of ``{map >= t}`` has at least
  ``n`` pixels. "An image is defective when a region above the level T has >= n pixels" is exactly
  ``region_level(map, n) >= T``, so the rule becomes a score whose threshold can be set like any
  other (a quantile of held-out good images). ``n = 1`` gives the map's maximum.
* :func:`integrated_anomaly`: the largest sum of ``(map - level)`` over one region at or above
  ``level``: a faint large region and a strong small one can weigh the same.
* :func:`region_stats`: how many regions lie at or above a level, and the largest one's area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy import ndimage

from ..errors import DefectscopeError

#: 8-connectivity: diagonal neighbours touch
EIGHT = np.ones((3, 3), dtype=bool)


def _check_map(amap: np.ndarray) -> np.ndarray:
    amap = np.asarray(amap)
    if amap.ndim != 2 or amap.size == 0:
        raise DefectscopeError(f"expected one (H, W) anomaly map, got shape {amap.shape}")
    if not np.isfinite(amap).all():
        raise DefectscopeError("the anomaly map holds NaN or infinite values")
    return amap


def label_regions(amap: np.ndarray, level: float) -> tuple[np.ndarray, int]:
    """(H, W) int32 labels (0: below ``level``, 1..K: the 8-connected regions at or above it) and K."""
    labels, count = ndimage.label(_check_map(amap) >= level, structure=EIGHT)
    return labels, int(count)


@dataclass(frozen=True)
class RegionStats:
    """The regions of one map at or above a level.

    count: number of 8-connected regions. largest: the largest one's area (pixels times ``pixel_area``,
    0 without a region). integrated: the largest sum of (map - level) x ``pixel_area`` over one region.
    """

    count: int
    largest: float
    integrated: float


def region_stats(amap: np.ndarray, level: float, pixel_area: float = 1.0) -> RegionStats:
    """Regions of the (H, W) map at or above ``level``; areas in units of ``pixel_area`` per map pixel."""
    labels, count = label_regions(amap, level)
    if count == 0:
        return RegionStats(0, 0.0, 0.0)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1)[1:]
    excess = np.bincount(flat, weights=(np.asarray(amap, np.float64) - level).ravel(), minlength=count + 1)[1:]
    return RegionStats(count, float(sizes.max()) * pixel_area, float(excess.max()) * pixel_area)


def integrated_anomaly(amap: np.ndarray, level: float, pixel_area: float = 1.0) -> float:
    """The largest sum over one 8-connected region at or above ``level`` of (map - level), times
    ``pixel_area``; 0.0 when no pixel reaches the level."""
    return region_stats(amap, level, pixel_area).integrated


@njit(cache=True, nogil=True)
def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


@njit(cache=True, nogil=True)
def _level_of_size(flat: np.ndarray, order: np.ndarray, h: int, w: int, n: int) -> int:
    """Position (in ``flat``) of the pixel at whose value a region first reaches ``n`` pixels, or -1.

    Pixels are added from the highest value down (``order``, the highest pixels of the map in
    descending order); each joins its already added 8-neighbours (union by size). The first time a
    region holds ``n`` pixels, the pixel just added has the highest level at which such a region
    exists: every pixel above it was added before and formed none. -1: no region reached ``n``
    within ``order``.
    """
    parent = np.full(h * w, -1, np.int64)
    size = np.zeros(h * w, np.int64)
    for p in order:
        parent[p] = p
        size[p] = 1
        y, x = p // w, p % w
        root = p
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy == 0 and dx == 0) or yy < 0 or yy >= h or xx < 0 or xx >= w:
                    continue
                q = yy * w + xx
                if parent[q] < 0:
                    continue
                other = _find(parent, q)
                if other == root:
                    continue
                if size[other] > size[root]:
                    root, other = other, root
                parent[other] = root
                size[root] += size[other]
        if size[root] >= n:
            return p
    return -1


def region_level(amap: np.ndarray, min_pixels: int) -> float:
    """The highest level t such that an 8-connected region of ``{map >= t}`` has >= ``min_pixels`` pixels.

    amap: (H, W) anomaly map. min_pixels: n >= 1; above H x W it is the whole map (the map's minimum).
    Then "defective when a region at or above T has >= n pixels" is ``region_level(amap, n) >= T``.
    Union-find from the highest pixel down over the top 16 n pixels, four times more until a region
    forms (a smooth map forms one within a few n; at most O(HW log HW)).
    """
    amap = _check_map(amap)
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, (int, np.integer)) or min_pixels < 1:
        raise DefectscopeError(f"min_pixels must be a whole number >= 1, got {min_pixels!r}")
    flat = np.ascontiguousarray(amap, dtype=np.float64).ravel()
    if min_pixels == 1:
        return float(flat.max())
    h, w = amap.shape
    n = min(int(min_pixels), h * w)
    k = min(16 * n, flat.size)
    while True:
        # the k highest pixels, highest first: every pixel above the k-th value is among them, so a
        # region found in them is found at the right level even where values tie at the k-th
        top = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
        order = top[np.argsort(-flat[top], kind="stable")]
        found = _level_of_size(flat, order, h, w, n)
        if found >= 0:
            return float(flat[found])
        k = min(4 * k, flat.size)
