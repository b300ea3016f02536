"""Evaluation protocols: the model's own resolution, or the literature's (masks at their own resolution)."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.data.layouts import mvtec_category
from defectscope.detectors.patchcore import PatchCore
from defectscope.evaluation.evaluate import evaluate_detector
from defectscope.evaluation.metrics import PixelMetrics, image_auroc
from defectscope.fitting import fit_detector


@pytest.fixture(scope="module")
def fitted(synthetic_category):
    split = mvtec_category(synthetic_category)
    det = PatchCore(image_size=64, coreset_ratio=0.25)
    meta = fit_detector(det, split.train)
    return det, split, meta["threshold"]


def test_mvtec_protocol_compares_at_the_masks_resolution(fitted):
    from defectscope.data.images import load_image, load_mask, preprocess
    from defectscope.report.heatmaps import resize_map

    det, split, threshold = fitted
    native = evaluate_detector(det, split, threshold)
    mvtec = evaluate_detector(det, split, threshold, protocol="mvtec")
    assert native["protocol"] == "native" and mvtec["protocol"] == "mvtec"
    assert native["image_auroc"] == mvtec["image_auroc"]
    # reference: maps upsampled to the 128 x 128 masks by hand
    mean, std = det.input_stats
    ref = PixelMetrics()
    maxima = []
    for s in split.test:
        image = load_image(s.path)
        amap = det.predict(preprocess(image, 64, mean, std)[None]).maps[0]
        maxima.append(amap.max())
        mask = load_mask(s.mask_path) if s.mask_path else np.zeros(image.shape[:2], bool)
        ref.add(resize_map(amap, mask.shape)[None], mask[None])
    assert mvtec["pixel_auroc"] == pytest.approx(ref.auroc(), abs=1e-6)
    assert mvtec["pixel_auroc"] != native["pixel_auroc"]
    labels = np.array([s.label for s in split.test])
    assert mvtec["image_auroc_map_max"] == pytest.approx(image_auroc(labels, np.array(maxima)), abs=1e-9)
    assert "image_auroc_map_max" not in native


def test_unknown_protocol_is_refused(fitted):
    from defectscope.errors import DefectscopeError

    det, split, threshold = fitted
    with pytest.raises(DefectscopeError, match="protocol"):
        evaluate_detector(det, split, threshold, protocol="visa")
