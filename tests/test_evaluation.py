"""evaluate_detector against brute-force references, with a stand-in detector (no backbone needed)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from defectscope.data.images import load_mask
from defectscope.data.layouts import load_category
from defectscope.detectors.base import Prediction
from defectscope.evaluation import metrics
from defectscope.evaluation.evaluate import evaluate_detector, image_metrics, normalized_score, pixel_roc_curve

SIZE = 64


class ColourDetector:
    """Anomaly map = distance of each pixel's colour from the image's median colour; score = map max.

    Records every map it hands out so tests can compute reference metrics by brute force.
    """

    method = "colour"
    backbone = "none"
    layers: ClassVar[list[str]] = ["rgb"]
    image_size = SIZE
    input_shape = (SIZE, SIZE)  # what the loader resizes photos to
    resize = "stretch"
    input_stats = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __init__(self) -> None:
        self.maps: list[np.ndarray] = []

    def predict(self, images: torch.Tensor) -> Prediction:
        med = images.flatten(2).median(dim=2).values[:, :, None, None]
        maps = torch.nn.functional.avg_pool2d(((images - med) ** 2).sum(1, keepdim=True), 5, 1, 2)[:, 0]
        maps = maps.numpy().astype(np.float32)
        self.maps.extend(maps)
        return Prediction(maps.reshape(len(maps), -1).max(1), maps)


@pytest.fixture(scope="module")
def evaluated(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory):
    split = load_category(synthetic_category)
    detector = ColourDetector()
    overlays = tmp_path_factory.mktemp("overlays")
    result = evaluate_detector(detector, split, threshold=0.05, overlay_dir=overlays, overlay_max_side=48)
    return split, detector, result, overlays


def test_image_metrics_match_brute_force(evaluated):
    _split, _, result, _ = evaluated
    labels = np.array([r["label"] for r in result["images"]])
    scores = np.array([r["score"] for r in result["images"]])
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    # F1-max by trying every threshold
    best = max(
        (2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + (labels == 1).sum()), t) for t in scores
    )
    assert result["image_f1_max"] == pytest.approx(best[0])
    assert (scores >= result["image_f1_threshold"]).sum() >= 1
    types = np.array([r["defect_type"] for r in result["images"]])
    for name in ("scratch", "spot"):
        keep = (types == "good") | (types == name)
        assert result["per_type_auroc"][name] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        assert result["per_type"][name]["n"] == int((types == name).sum())
        assert result["per_type"][name]["flagged"] == int((scores[types == name] >= 0.05).sum())
    c = result["confusion"]
    assert c["tp"] + c["fn"] == result["n_defective"] == 10 and c["tn"] + c["fp"] == result["n_good"] == 10


def test_pixel_metrics_match_brute_force(evaluated):
    split, detector, result, _ = evaluated
    masks = [
        load_mask(s.mask_path, size=(SIZE, SIZE)) if s.mask_path else np.zeros((SIZE, SIZE), bool) for s in split.test
    ]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in detector.maps])
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert result["pixel_auroc_exact"] is True
    # the stored pixel ROC curve integrates to the AUROC (thinned to ~512 points, so loosely)
    roc = result["curves"]["pixel_roc"]
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(result["pixel_auroc"], abs=0.01)
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and np.all(np.diff(roc["fpr"]) >= 0)
    # AUPRO: PRO at a few thresholds by brute force, the stored curve passes through them
    assert 0.0 < result["aupro"] <= 1.0 and result["aupro_fpr_limit"] == 0.3
    pro = result["curves"]["pro"]
    assert pro["fpr"][0] == 0 and max(pro["fpr"]) >= 0.3 - 1e-9 and len(pro["fpr"]) <= 520
    pm = metrics.PixelMetrics()
    for amap, mask in zip(detector.maps, masks):
        pm.add(amap, mask)
    assert result["aupro"] == pytest.approx(pm.aupro(0.3))
    f1, t = result["pixel_f1_max"], result["pixel_f1_threshold"]
    pred = s >= t
    assert f1 == pytest.approx(2 * (pred & y).sum() / (pred.sum() + y.sum()), rel=1e-6)


def test_curves_are_short_and_maps_are_not_kept(evaluated):
    _, _, result, _overlays = evaluated
    assert "maps" not in result and all("map" not in r for r in result["images"])
    for curve in result["curves"].values():
        assert curve is not None and all(len(v) <= 520 for v in curve.values())
    import json

    json.dumps(result, allow_nan=False)  # strict JSON: no NaN anywhere


def test_overlays_written_small_and_linked(evaluated):
    _, _, result, overlays = evaluated
    from defectscope.data.images import load_image

    for r in result["images"]:
        png = overlays / r["overlay"]
        assert png.is_file() and r["overlay"].startswith(r["defect_type"] + "/")
        assert max(load_image(png).shape[:2]) <= 48
        assert r["normalized_score"] == pytest.approx(r["score"] / 0.05)


def test_image_metrics_one_class_gives_none():
    out = image_metrics(np.zeros(4, np.int64), np.arange(4.0), ["good"] * 4, threshold=2.0)
    assert out["image_auroc"] is None and out["image_f1_max"] is None and out["_image_roc"] is None
    assert out["confusion"] == {"tp": 0, "fp": 2, "tn": 2, "fn": 0}
    assert out["per_type"]["good"]["flagged"] == 2


def test_pixel_roc_curve_binned_mode_matches_exact():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 32, 32)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[:3, 10:20, 10:20] = True
    maps[masks] += 1.5
    exact, binned = metrics.PixelMetrics(), metrics.PixelMetrics(max_bytes=64)
    exact.add(maps, masks)
    binned.add(maps, masks)
    assert exact.exact and not binned.exact
    fe, te = pixel_roc_curve(exact)
    fb, tb = pixel_roc_curve(binned)
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert np.trapezoid(te, fe) == pytest.approx(ref, abs=2e-3)
    assert np.trapezoid(tb, fb) == pytest.approx(ref, abs=5e-3)


def test_normalized_score():
    assert normalized_score(2.0, 4.0) == 0.5
    assert normalized_score(2.0, 0.0) is None and normalized_score(None, 1.0) is None
