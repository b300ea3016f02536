"""Metrics against scikit-learn and slow, literal reference implementations."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from defectscope.errors import DefectscopeError
from defectscope.evaluation.metrics import (
    PixelMetrics,
    _RunningHistogram,
    confusion_at,
    f1_max,
    image_auroc,
    per_type_auroc,
    roc_curve,
)

# ----------------------------------------------------------------------------- references


def brute_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Try every distinct score as threshold (defective when score >= t); highest t wins ties."""
    best, best_t = -1.0, None
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best:
            best, best_t = f1, t
    return float(best), float(best_t)


def flood_regions(mask: np.ndarray, eight: bool = True) -> list[np.ndarray]:
    """Connected regions of a 2-D bool mask by breadth-first flood fill."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if eight:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region = np.zeros_like(mask, dtype=bool)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            region[y, x] = True
            for dy, dx in steps:
                v, u = y + dy, x + dx
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    queue.append((v, u))
        regions.append(region)
    return regions


def slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Loop over every distinct score, compute FPR and PRO literally, trapezoid up to ``limit``."""
    regions = [(i, r) for i, m in enumerate(masks) for r in flood_regions(m)]
    ok = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & ok).sum() / ok.sum())
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < limit:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
        break
    return area / limit


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Several small rectangles per image, some images defect-free, one diagonal contact."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # good image
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[i, y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = True
    masks[1, :, :] = False
    masks[1, 2:4, 2:4] = True
    masks[1, 4:6, 4:6] = True  # touches the first square only at a corner
    return masks


def realistic(rng: np.random.Generator, n: int = 24, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Smooth anomaly maps that are higher inside blob-shaped defects."""
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 6, 6))
    masks = noise > np.quantile(noise, 0.97)
    masks[::4] = False
    maps = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 3, 3))
    maps = maps + 0.15 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 2, 2))
    return maps.astype(np.float32), masks


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_and_roc_curve_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 15, 200) + 0.5 * labels  # many ties, some signal
    assert image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, thr = roc_curve(labels, scores)
    s_fpr, s_tpr, s_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, s_fpr)
    np.testing.assert_allclose(tpr, s_tpr)
    np.testing.assert_array_equal(thr, s_thr)


def test_image_auroc_single_class_is_none() -> None:
    assert image_auroc(np.zeros(5), np.arange(5.0)) is None
    assert image_auroc(np.ones(5), np.arange(5.0)) is None
    assert image_auroc(np.array([0, 1]), np.array([0.0, 1.0])) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_max_matches_brute_force_and_confusion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 80).astype(bool)
    scores = np.round(rng.normal(size=80) + labels, 1)
    f1, t = f1_max(labels, scores)
    ref_f1, ref_t = brute_f1(labels, scores)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert t == ref_t
    c = confusion_at(labels, scores, t)
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == 80
    assert 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) == pytest.approx(f1)


def test_f1_max_tie_returns_highest_threshold() -> None:
    # t=4 gives tp=1, fp=0, fn=1 and t=1 gives tp=2, fp=2, fn=0: both F1 = 2/3
    assert f1_max([1, 0, 0, 1], [4.0, 3.0, 2.0, 1.0]) == (pytest.approx(2 / 3), 4.0)
    assert f1_max([0, 0], [0.1, 0.2]) == (0.0, float("inf"))


def test_confusion_at_uses_greater_or_equal() -> None:
    c = confusion_at([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9], 0.5)
    assert c == {"tp": 2, "fp": 1, "tn": 1, "fn": 0}


def test_per_type_auroc_is_each_type_against_good() -> None:
    rng = np.random.default_rng(3)
    types = ["good"] * 20 + ["crack"] * 10 + ["scratch"] * 12
    labels = np.array([t != "good" for t in types], dtype=int)
    scores = rng.normal(size=len(types)) + np.array([{"good": 0, "crack": 2, "scratch": 0.3}[t] for t in types])
    out = per_type_auroc(labels, scores, types)
    assert list(out) == ["crack", "scratch"]
    for name in out:
        keep = np.array([t in ("good", name) for t in types])
        assert out[name] == pytest.approx(skm.roc_auc_score(labels[keep], scores[keep]))
    assert out["crack"] > out["scratch"]
    assert per_type_auroc([1, 1], [0.2, 0.3], ["a", "b"]) == {"a": None, "b": None}


def test_nan_scores_and_bad_labels_raise_value_error() -> None:
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        f1_max([0, 1], [np.inf, 0.3])
    with pytest.raises(DefectscopeError, match="labels"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        roc_curve([0, 1, 1], [0.1, 0.2])


# ----------------------------------------------------------------------------- pixel level


def test_pixel_auroc_exact_matches_sklearn_over_batches() -> None:
    rng = np.random.default_rng(0)
    maps, masks = realistic(rng, n=12, size=48)
    maps = np.round(maps, 2)  # ties between defect and good pixels
    pm = PixelMetrics()
    for i in range(0, 12, 5):
        pm.add(maps[i : i + 5], masks[i : i + 5])
    assert pm.exact
    ref = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pm.auroc() == pytest.approx(ref, abs=1e-12)
    assert pm.auroc_error_bound() == 0.0


def test_pixel_f1_max_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    maps, masks = realistic(rng, n=6, size=24)
    maps = np.round(maps, 2)
    pm = PixelMetrics()
    pm.add(maps, masks)
    f1, t = pm.f1_max()
    ref_f1, ref_t = brute_f1(masks.ravel(), maps.ravel())
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert t == pytest.approx(ref_t)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n=7, h=9, w=10)
    maps = np.round(rng.normal(size=masks.shape) + 0.8 * masks, 1).astype(np.float32)
    pm = PixelMetrics()
    pm.add(maps[:4], masks[:4])
    pm.add(maps[4:], masks[4:])
    assert pm.n_regions == sum(len(flood_regions(m)) for m in masks)
    for limit in (0.3, 0.05, 1.0):
        assert pm.aupro(limit) == pytest.approx(slow_aupro(maps, masks, limit), abs=1e-6)


def test_diagonal_contact_is_one_region() -> None:
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 0:2, 0:2] = True
    mask[0, 2:4, 2:4] = True  # corner contact with the first square
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 0:2, 0:2] = 1.0  # only the first square is detected
    pm = PixelMetrics()
    pm.add(maps, mask)
    assert pm.n_regions == 1
    fpr, pro = pm.pro_curve()
    # threshold 1.0 flags 4 of the one region's 8 pixels and no good pixel
    assert (0.0, 0.5) in set(zip(fpr.tolist(), pro.tolist()))
    pm4 = PixelMetrics(connectivity=4)
    pm4.add(maps, mask)
    assert pm4.n_regions == 2


def test_binned_mode_close_to_exact_on_realistic_maps() -> None:
    rng = np.random.default_rng(7)
    maps, masks = realistic(rng)
    exact, binned = PixelMetrics(), PixelMetrics(max_bytes=0)
    for i in range(0, len(maps), 8):
        exact.add(maps[i : i + 8], masks[i : i + 8])
        binned.add(maps[i : i + 8], masks[i : i + 8])
    assert exact.exact and not binned.exact
    a_exact, a_binned = exact.auroc(), binned.auroc()
    assert 0.6 < a_exact < 0.99  # informative but imperfect maps
    assert abs(a_binned - a_exact) <= binned.auroc_error_bound() + 1e-12
    assert abs(a_binned - a_exact) < 1e-3
    assert abs(binned.aupro() - exact.aupro()) < 1e-3
    assert abs(binned.f1_max()[0] - exact.f1_max()[0]) < 1e-3


def test_switch_to_histogram_and_growing_range() -> None:
    rng = np.random.default_rng(2)
    maps, masks = realistic(rng, n=16, size=64)
    scale = np.array([1.0, 1.0, 4.0, -3.0] * 4, dtype=np.float32)[:, None, None]
    maps = maps * scale + scale  # later batches reach beyond the first batches' range, both ways
    exact, binned = PixelMetrics(), PixelMetrics(max_bytes=2 * 64 * 64 * 4)
    for i in range(0, 16, 2):
        exact.add(maps[i : i + 2], masks[i : i + 2])
        binned.add(maps[i : i + 2], masks[i : i + 2])
    assert not binned.exact
    assert abs(binned.auroc() - exact.auroc()) <= binned.auroc_error_bound() + 1e-12
    assert abs(binned.auroc() - exact.auroc()) < 1e-3
    assert abs(binned.aupro() - exact.aupro()) < 1e-3


def test_running_histogram_merges_counts_exactly() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=500), rng.normal(size=500) * 10 + 30, rng.normal(size=500) - 50]
    hist = _RunningHistogram(64, float(parts[0].min()), float(parts[0].max()))
    for p in parts:
        hist.add(p)
    values = np.concatenate(parts)
    assert hist.lo <= values.min() and values.max() < hist.hi
    np.testing.assert_array_equal(hist.counts, np.bincount(hist.bin_of(values), minlength=64))


def test_no_defect_pixels_and_constant_maps() -> None:
    pm = PixelMetrics()
    pm.add(np.random.default_rng(0).random((3, 8, 8)), np.zeros((3, 8, 8), bool))
    assert pm.auroc() is None and pm.aupro() is None and pm.f1_max() is None
    assert pm.pro_curve() is None

    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:5] = True
    pm = PixelMetrics()
    pm.add(np.full((2, 8, 8), 0.7, np.float32), masks)
    assert pm.auroc() == 0.5
    # curve (0,0) -> (1,1): area up to 0.3 is 0.045, normalised 0.15
    assert pm.aupro() == pytest.approx(0.15)
    assert pm.aupro() == pytest.approx(slow_aupro(np.full((2, 8, 8), 0.7), masks))


def test_nan_in_maps_and_shape_mismatch_raise() -> None:
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PixelMetrics().add(maps, np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="shaped"):
        PixelMetrics().add(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        PixelMetrics().aupro(0.0)


def test_storage_is_float32_not_float64() -> None:
    rng = np.random.default_rng(0)
    pm = PixelMetrics()
    n_defect = 0
    for _ in range(10):
        maps = rng.random((20, 256, 256))  # float64 input
        masks = np.zeros((20, 256, 256), bool)
        masks[:, 100:110, 50:70] = True
        n_defect += int(masks.sum())
        pm.add(maps, masks)
    n_total = 200 * 256 * 256
    assert pm.n_pos == n_defect and pm.n_neg == n_total - n_defect
    stored = [*pm._neg, *pm._pos, *pm._pos_region]
    assert {a.dtype for a in stored} <= {np.dtype(np.float32), np.dtype(np.int32)}
    # 4 bytes per good pixel, 4 + 4 per defect pixel, 8 per region: no float64 copies
    assert pm.nbytes == 4 * pm.n_neg + 8 * pm.n_pos + 8 * pm.n_regions
    assert pm.nbytes < 4.2 * n_total
    assert pm.auroc() == pytest.approx(0.5, abs=0.01)
