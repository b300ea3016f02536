"""Real data: each method with its defaults (backbone tf_efficientnet_lite0) on MVTec AD bottle.

Floors are those of the reference implementations on bottle (anomalib: PatchCore image AUROC
1.000); PatchCore keeps 1 % of the patches, as in the comparison the floors come from.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from defectscope.data.layouts import mvtec_category
from defectscope.detectors import make_detector
from defectscope.evaluation import evaluate_detector
from defectscope.fitting import fit_detector

pytestmark = [pytest.mark.real, pytest.mark.slow]

# method -> (parameters, image AUROC floor, pixel AUROC floor)
FLOORS = {
    "patchcore": ({"coreset_ratio": 0.01}, 0.999, 0.987),
    "padim": ({}, 0.998, 0.982),
    "spade": ({}, 0.97, 0.96),
}


@pytest.mark.parametrize("method", sorted(FLOORS))
def test_method_defaults_on_bottle(method: str, bottle: Path) -> None:
    params, image_floor, pixel_floor = FLOORS[method]
    split = mvtec_category(bottle)
    detector = make_detector(method, **params)
    assert detector.backbone == "tf_efficientnet_lite0" and detector.image_size == 256
    meta = fit_detector(detector, split.train)
    result = evaluate_detector(detector, split, float(meta["threshold"]))
    assert result["n_good"] == 20 and result["n_defective"] == 63 and result["n_failed"] == 0
    summary = f"{method}: image AUROC {result['image_auroc']:.4f}, pixel AUROC {result['pixel_auroc']:.4f}"
    assert result["image_auroc"] >= image_floor, summary
    assert result["pixel_auroc"] >= pixel_floor, summary
