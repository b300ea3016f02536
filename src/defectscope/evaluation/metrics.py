"""Evaluation metrics: image-level ROC/F1 and streaming pixel-level AUROC, F1 and AUPRO.

Conventions used everywhere in this module:

* Higher score = more anomalous; label 1 = defective, 0 = good.
* A sample (image or pixel) is *predicted defective* when ``score >= threshold``.
  :func:`f1_max`, :func:`confusion_at`, :func:`roc_curve` and :class:`PixelMetrics`
  all use this rule, so the threshold returned by :func:`f1_max` reproduces its F1 in
  :func:`confusion_at`.
* Ties are handled as in scikit-learn: ROC AUC is the trapezoid area under the ROC
  curve, which equals the Mann-Whitney statistic with a tied (defective, good) pair
  counting 1/2.
* Scores containing NaN or +/-inf are rejected with :class:`MetricInputError`.

PRO / AUPRO follow Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021
(per-region overlap, integrated up to FPR 0.3). Ground-truth regions are the connected components of
each mask with **8-connectivity** (a 3x3 all-ones structuring element), which is what
MVTec's official evaluation script (``compute_pro``) passes to ``scipy.ndimage.label``;
note ``scipy.ndimage.label``'s own default would be 4-connectivity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..errors import DefectscopeError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 30
"""Default budget for stored good-pixel scores before :class:`PixelMetrics` switches to a histogram."""

HIST_BINS = 1 << 16
"""Number of histogram bins used for good-pixel scores in binned mode."""


class MetricInputError(DefectscopeError, ValueError):
    """Labels, scores or maps that a metric cannot be computed from (NaN, wrong shape, bad labels)."""


# ----------------------------------------------------------------------------- validation


def _check_scores(scores: np.ndarray, what: str) -> None:
    if scores.size and not np.isfinite(scores).all():
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        raise MetricInputError(f"{what} contain {bad} NaN/inf value(s); fix the detector output or drop those samples")


def _labels_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (labels as bool (N,), scores as float64 (N,))."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricInputError(f"labels ({y.size}) and scores ({s.size}) must have the same length")
    if y.size == 0:
        raise MetricInputError("labels and scores are empty; evaluate at least one sample")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise MetricInputError(f"labels must be 0 (good) or 1 (defective), got values {np.unique(y)[:5]}")
        y = y.astype(bool)
    _check_scores(s, "scores")
    return y, s


# ----------------------------------------------------------------------------- shared cores


def _auroc_sorted(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    """Mann-Whitney AUC: P(pos > neg) + 1/2 P(pos == neg); neg_sorted ascending.

    Equal to the trapezoid area under the ROC curve (scikit-learn's definition).
    """
    below = np.searchsorted(neg_sorted, pos, side="left")
    at_or_below = np.searchsorted(neg_sorted, pos, side="right")
    # integer sums are exact; the tie term is halved once at the end
    wins2 = 2 * int(below.sum(dtype=np.int64)) + int((at_or_below - below).sum(dtype=np.int64))
    return wins2 / (2.0 * pos.size * neg_sorted.size)


def _best_f1(
    pos_sorted: np.ndarray, count_neg_at_least: np.ndarray | None, thresholds: np.ndarray
) -> tuple[float, float]:
    """Best F1 over ``thresholds`` (unique positive scores, ascending).

    count_neg_at_least[i] = number of negatives with score >= thresholds[i]. Raising a
    threshold to the next positive score never loses a true positive and never adds a
    false positive, so the unique positive scores are enough candidates.
    Ties in F1 are broken towards the highest threshold.
    """
    n_pos = pos_sorted.size
    tp = n_pos - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = count_neg_at_least if count_neg_at_least is not None else np.zeros_like(tp)
    f1 = 2.0 * tp / (2.0 * tp + fp + (n_pos - tp))
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # highest threshold among the maxima
    return float(f1[best]), float(thresholds[best])


def _integrate_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under pro(fpr) on [0, limit], the curve interpolated at ``limit``.

    fpr must be non-decreasing and start at 0; points beyond ``limit`` are only used for
    the interpolation.
    """
    inside = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], pro[:inside]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) * 0.5)
    if x[-1] < limit and inside < fpr.size:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_lim) * (limit - x0)
    return area


# ----------------------------------------------------------------------------- image level


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve like ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

    labels: (N,) 0/1; scores: (N,). Returns (fpr, tpr, thresholds), each (K+1,), where K
    is the number of distinct scores: thresholds descend from +inf, and point k counts
    samples with score >= thresholds[k]. A rate whose class is absent is all NaN.
    """
    y, s = _labels_scores(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s_desc)), s_desc.size - 1]
    tps = np.cumsum(y_desc, dtype=np.int64)[last_of_value]
    fps = last_of_value + 1 - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, s_desc[last_of_value]]
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    tpr = tps / n_pos if n_pos else np.full(tps.shape, np.nan)
    fpr = fps / n_neg if n_neg else np.full(fps.shape, np.nan)
    return fpr, tpr, thresholds


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of image scores (N,) against labels (N,); None if only one class is present."""
    y, s = _labels_scores(labels, scores)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return None
    return _auroc_sorted(pos, np.sort(neg))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (defective when score >= it).

    labels, scores: (N,). Among equally good thresholds the highest is returned. Without
    any defective sample F1 is 0 everywhere; then ``(0.0, inf)`` (flag nothing) is returned.
    """
    y, s = _labels_scores(labels, scores)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if pos.size == 0:
        return 0.0, math.inf
    thresholds = np.unique(pos)
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    return _best_f1(pos, fp, thresholds)


def confusion_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts {"tp", "fp", "tn", "fn"} when a sample is flagged defective iff score >= threshold."""
    y, s = _labels_scores(labels, scores)
    pred = s >= threshold
    return {
        "tp": int(np.count_nonzero(pred & y)),
        "fp": int(np.count_nonzero(pred & ~y)),
        "tn": int(np.count_nonzero(~pred & ~y)),
        "fn": int(np.count_nonzero(~pred & y)),
    }


def per_type_auroc(labels: np.ndarray, scores: np.ndarray, types: Sequence[str]) -> dict[str, float | None]:
    """AUROC of each defect type against the good images (type "good").

    labels, scores: (N,); types: N type names. Keys are the non-"good" types in order of
    first appearance; a value is None when the subset holds only one class (e.g. no good images).
    """
    y, s = _labels_scores(labels, scores)
    t = np.asarray(list(types), dtype=object)
    if t.shape != y.shape:
        raise MetricInputError(f"types ({t.size}) and labels ({y.size}) must have the same length")
    good = t == "good"
    out: dict[str, float | None] = {}
    for name in dict.fromkeys(t.tolist()):
        if name == "good":
            continue
        keep = good | (t == name)
        out[str(name)] = image_auroc(y[keep], s[keep])
    return out


# ----------------------------------------------------------------------------- pixel level


class _RunningHistogram:
    """Fixed-count histogram over a range that grows by doubling the bin width.

    Bins are [lo + k*w, lo + (k+1)*w), k = 0..nbins-1. When a value falls outside,
    neighbouring bins are merged pairwise (width doubles) so old counts stay exact.
    """

    def __init__(self, nbins: int, lo: float, hi: float) -> None:
        self.nbins = nbins
        self.counts = np.zeros(nbins, dtype=np.int64)
        self.lo = lo
        spread = hi - lo
        self.width = spread / nbins * (1.0 + 1e-9) if spread > 0 else max(abs(lo), 1.0) * 2.0**-30

    @property
    def hi(self) -> float:
        return self.lo + self.nbins * self.width

    def _merge_pairs(self) -> np.ndarray:
        return self.counts.reshape(-1, 2).sum(axis=1)

    def add(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        xmin, xmax = float(x.min()), float(x.max())
        half = self.nbins // 2
        while xmin < self.lo:  # grow downwards: old bins go to the upper half
            merged = self._merge_pairs()
            self.counts[:] = 0
            self.counts[half:] = merged
            self.lo -= self.nbins * self.width
            self.width *= 2.0
        while xmax >= self.hi:  # grow upwards: old bins go to the lower half
            merged = self._merge_pairs()
            self.counts[:] = 0
            self.counts[:half] = merged
            self.width *= 2.0
        self.counts += np.bincount(self.bin_of(x), minlength=self.nbins)

    def bin_of(self, x: np.ndarray) -> np.ndarray:
        """Bin index of each value, clipped to the range (values must lie inside it)."""
        idx = np.floor((x.astype(np.float64) - self.lo) / self.width)
        return np.clip(idx, 0, self.nbins - 1).astype(np.int64)

    def count_at_least(self, t: np.ndarray) -> np.ndarray:
        """Approximate number of values >= t: whole bins above, linear share of t's own bin."""
        t = np.asarray(t, dtype=np.float64)
        above = np.r_[np.cumsum(self.counts[::-1])[::-1], 0]  # above[k] = counts in bins >= k
        pos = (t - self.lo) / self.width
        k = np.clip(np.floor(pos), 0, self.nbins - 1).astype(np.int64)
        share = np.clip(k + 1 - pos, 0.0, 1.0)
        est = above[k + 1] + share * self.counts[k]
        est = np.where(pos < 0, above[0], est)
        return np.where(pos >= self.nbins, 0.0, est)


class PixelMetrics:
    """Streaming accumulator for pixel-level metrics over a test set, memory bounded.

    Call :meth:`add` with each batch of anomaly maps (B, H, W) and ground-truth masks
    (B, H, W) (non-zero = defect), then read :meth:`auroc`, :meth:`f1_max`,
    :meth:`aupro` and :meth:`pro_curve`.

    Storage: defect pixels are kept exactly (score float32 + region id int32, 8 bytes
    each). Good pixels are kept as float32 scores (4 bytes each) while they fit in
    ``max_bytes``; then they are folded into a 2^16-bin histogram whose range grows by
    doubling (``exact`` becomes False). Maps given as float64 are stored as float32, so
    all metrics are exact for the float32-rounded maps.

    Error bound in binned mode: only (defect, good) pixel pairs in the same bin are
    uncertain and are counted as ties, so
    ``|auroc - exact| <= 0.5 * sum_b pos_b * neg_b / (P * N)`` (see
    :meth:`auroc_error_bound`). The PRO curve is evaluated at the bin edges, where it is
    exact, and joined by straight lines; the area error is at most half the summed
    area of the boxes between consecutive edges, i.e. about one bin's share of the FPR.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, connectivity: int = 8) -> None:
        if connectivity not in (4, 8):
            raise MetricInputError(f"connectivity must be 4 or 8, got {connectivity}")
        self.max_bytes = int(max_bytes)
        self.connectivity = connectivity
        self._structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
        self._neg: list[np.ndarray] = []  # float32 good-pixel scores (exact mode)
        self._neg_sorted = False
        self._hist: _RunningHistogram | None = None
        self._pos: list[np.ndarray] = []  # float32 defect-pixel scores
        self._pos_region: list[np.ndarray] = []  # int32 global region id per defect pixel
        self._pos_sorted = False
        self._region_sizes: list[np.ndarray] = []  # int64 pixel count per region
        self.n_images = 0
        self.n_neg = 0
        self.n_pos = 0
        self.n_regions = 0

    # -- accumulation ---------------------------------------------------------------

    @property
    def exact(self) -> bool:
        """True while good-pixel scores are stored exactly (no histogram yet)."""
        return self._hist is None

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored scores, region ids, region sizes and histogram."""
        arrays = [*self._neg, *self._pos, *self._pos_region, *self._region_sizes]
        total = sum(a.nbytes for a in arrays)
        return total + (self._hist.counts.nbytes if self._hist is not None else 0)

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Accumulate one batch: maps (B, H, W) float scores, masks (B, H, W) bool/0-1/0-255.

        A single (H, W) map and mask are accepted too.
        """
        maps = np.asarray(maps)
        masks = np.asarray(masks)
        if maps.ndim == 2:
            maps, masks = maps[None], masks[None]
        if maps.ndim != 3 or maps.shape != masks.shape:
            raise MetricInputError(f"maps {maps.shape} and masks {masks.shape} must both be shaped (B, H, W)")
        maps32 = maps.astype(np.float32, copy=False)
        _check_scores(maps32, "anomaly maps")
        defect = masks if masks.dtype == bool else masks > 0

        labels = np.empty(maps.shape, dtype=np.int32)
        for i in range(maps.shape[0]):
            n = ndimage.label(defect[i], structure=self._structure, output=labels[i])
            sizes = np.bincount(labels[i].ravel(), minlength=n + 1)[1:]
            labels[i][defect[i]] += self.n_regions - 1  # global ids 0.. (only defect pixels used)
            self._region_sizes.append(sizes.astype(np.int64))
            self.n_regions += n
        pos = maps32[defect]
        neg = maps32[~defect]
        self._pos.append(pos)
        self._pos_region.append(labels[defect])
        self._pos_sorted = False
        self.n_pos += pos.size
        self.n_neg += neg.size
        self.n_images += maps.shape[0]
        if self._hist is not None:
            self._hist.add(neg)
        else:
            self._neg.append(neg)
            self._neg_sorted = False
            if 4 * self.n_neg > self.max_bytes:
                self._to_histogram()

    def _to_histogram(self) -> None:
        """Fold the stored good-pixel scores into a histogram and free them."""
        nonempty = [a for a in self._neg if a.size]
        lo = min(float(a.min()) for a in nonempty)
        hi = max(float(a.max()) for a in nonempty)
        self._hist = _RunningHistogram(HIST_BINS, lo, hi)
        for a in nonempty:
            self._hist.add(a)
        log.info(
            "pixel metrics: %d good-pixel scores exceed %d bytes; switched to a %d-bin histogram",
            self.n_neg,
            self.max_bytes,
            HIST_BINS,
        )
        self._neg = []

    # -- consolidated views ---------------------------------------------------------

    def _sorted_neg(self) -> np.ndarray:
        """All good-pixel scores, float32 ascending (exact mode only)."""
        if not self._neg_sorted:
            neg = np.concatenate(self._neg) if self._neg else np.empty(0, np.float32)
            neg.sort()
            self._neg, self._neg_sorted = [neg], True
        return self._neg[0]

    def _sorted_pos(self) -> tuple[np.ndarray, np.ndarray]:
        """Defect-pixel scores (float32, ascending) and their global region ids (int32)."""
        if not self._pos_sorted:
            pos = np.concatenate(self._pos) if self._pos else np.empty(0, np.float32)
            reg = np.concatenate(self._pos_region) if self._pos_region else np.empty(0, np.int32)
            order = np.argsort(pos, kind="stable")
            self._pos, self._pos_region = [pos[order]], [reg[order]]
            self._pos_sorted = True
        return self._pos[0], self._pos_region[0]

    def _count_neg_at_least(self, t: np.ndarray) -> np.ndarray:
        if self._hist is not None:
            return self._hist.count_at_least(t)
        neg = self._sorted_neg()
        return neg.size - np.searchsorted(neg, t.astype(np.float32), side="left")

    # -- metrics --------------------------------------------------------------------

    def auroc(self) -> float | None:
        """Pixel ROC AUC over every added pixel; None without defect or without good pixels."""
        if self.n_pos == 0 or self.n_neg == 0:
            return None
        pos, _ = self._sorted_pos()
        if self._hist is None:
            return _auroc_sorted(pos, self._sorted_neg())
        h = self._hist
        below_bins = np.r_[0, np.cumsum(h.counts)]  # below_bins[k] = counts in bins < k
        raw = np.floor((pos.astype(np.float64) - h.lo) / h.width)
        k = np.clip(raw, 0, h.nbins - 1).astype(np.int64)
        inside = (raw >= 0) & (raw < h.nbins)
        wins = np.where(inside, below_bins[k] + 0.5 * h.counts[k], np.where(raw < 0, 0.0, self.n_neg))
        return float(wins.sum() / (float(self.n_pos) * self.n_neg))

    def auroc_error_bound(self) -> float:
        """Upper bound on |auroc() - exact AUROC|: 0.0 in exact mode, else same-bin pairs / 2."""
        if self._hist is None or self.n_pos == 0 or self.n_neg == 0:
            return 0.0
        pos, _ = self._sorted_pos()
        h = self._hist
        raw = np.floor((pos.astype(np.float64) - h.lo) / h.width)
        inside = (raw >= 0) & (raw < h.nbins)
        per_bin = np.bincount(raw[inside].astype(np.int64), minlength=h.nbins)
        return float(0.5 * np.dot(per_bin.astype(np.float64), h.counts) / (float(self.n_pos) * self.n_neg))

    def f1_max(self) -> tuple[float, float] | None:
        """Best pixel F1 and its threshold (defect when score >= it); None without defect pixels."""
        if self.n_pos == 0:
            return None
        pos, _ = self._sorted_pos()
        thresholds = np.unique(pos)
        fp = self._count_neg_at_least(thresholds) if self.n_neg else None
        return _best_f1(pos, fp, thresholds)

    def pro_curve(self, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
        """PRO as a function of FPR, (fpr, pro) float64 (K,), both starting at 0.

        Point k is one threshold t (descending): fpr = good pixels >= t / all good pixels
        (good images included); pro = mean over ground-truth regions of the region's
        fraction of pixels >= t (Bergmann et al. IJCV 2021, per-region overlap).
        Points stop at the first one with fpr > ``fpr_limit``. None without defect or
        good pixels.
        """
        if self.n_pos == 0 or self.n_neg == 0:
            return None
        pos, region = self._sorted_pos()
        sizes = np.concatenate(self._region_sizes)
        # each defect pixel raises PRO by 1 / (num_regions * |its region|) once flagged
        gain = 1.0 / (self.n_regions * sizes[region].astype(np.float64))
        pro_of_count = np.r_[0.0, np.cumsum(gain[::-1])]  # PRO when the top c defect pixels are flagged

        if self._hist is None:
            neg = self._sorted_neg()
            n_neg = neg.size
            allowed = math.floor(fpr_limit * n_neg)
            if allowed >= n_neg:
                t_cut = min(float(neg[0]), float(pos[0]))
            else:
                t_cut = float(neg[n_neg - 1 - allowed])  # first threshold with fpr > limit
            tail_neg = neg[np.searchsorted(neg, np.float32(t_cut), side="left") :]
            tail_pos = pos[np.searchsorted(pos, np.float32(t_cut), side="left") :]
            thresholds = np.unique(np.concatenate([tail_neg, tail_pos]))[::-1]
            fp = n_neg - np.searchsorted(neg, thresholds, side="left")
        else:
            h = self._hist
            thresholds = h.lo + h.width * np.arange(h.nbins, -1, -1, dtype=np.float64)
            above = np.r_[np.cumsum(h.counts[::-1])[::-1], 0]
            fp = above[np.arange(h.nbins, -1, -1)]
            n_neg = self.n_neg
        flagged = pos.size - np.searchsorted(pos.astype(np.float64), thresholds.astype(np.float64), side="left")
        fpr = np.r_[0.0, fp / n_neg]
        pro = np.r_[0.0, np.minimum(pro_of_count[flagged], 1.0)]
        if self._hist is not None:  # the lowest edge may sit above some defect pixels
            fpr, pro = np.r_[fpr, 1.0], np.r_[pro, 1.0]
        stop = int(np.searchsorted(fpr, fpr_limit, side="right"))
        stop = min(stop + 1, fpr.size)  # keep the first point beyond the limit
        return fpr[:stop], pro[:stop]

    def aupro(self, fpr_limit: float = 0.3) -> float | None:
        """Area under PRO(FPR) on [0, fpr_limit], interpolated at the limit, divided by it.

        Bergmann et al. (IJCV 2021) use fpr_limit = 0.3. None without defect or good pixels.
        """
        if not 0.0 < fpr_limit <= 1.0:
            raise MetricInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        curve = self.pro_curve(fpr_limit)
        if curve is None:
            return None
        fpr, pro = curve
        return _integrate_to(fpr, pro, fpr_limit) / fpr_limit
