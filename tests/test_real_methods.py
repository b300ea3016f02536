"""Real data: each method with its defaults (backbone tf_efficientnet_lite0) on MVTec AD bottle and pill.

Bottle floors: the reference implementations' (anomalib: PatchCore image AUROC 1.000), PatchCore at
1 % of the patches for speed; PatchCore's pixel floor follows its default normalisation (the
weights' own statistics, 288 px and layers weighted equally, decided on the development suite: 0.9876
at 1 %; 0.9873 with ImageNet's statistics at 256 px, channels concatenated). Pill floors: this revision's development-suite figures (README, "Accuracy beyond
bottle") less about 0.005, so that a default that slips on a second kind of part fails here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from defectscope.data.layouts import mvtec_category
from defectscope.detectors import make_detector
from defectscope.detectors.patchcore import PATCHCORE_IMAGE_SIZE
from defectscope.evaluation.evaluate import evaluate_detector
from defectscope.fitting import fit_detector

pytestmark = [pytest.mark.real, pytest.mark.slow]

# method -> (parameters, image AUROC floor, pixel AUROC floor)
FLOORS = {
    "patchcore": ({"coreset_ratio": 0.01}, 0.999, 0.985),
    "padim": ({}, 0.998, 0.982),
    "spade": ({}, 0.97, 0.96),
}
#: pill: (image AUROC floor, pixel AUROC floor) at each method's defaults (measured: PatchCore 0.9615 / 0.9784
#: at 288 px with layers weighted equally, PaDiM 0.8953 / 0.9615 with epsilon 1.0, SPADE 0.7578 / 0.9465 with k = 5)
PILL_FLOORS = {"patchcore": (0.955, 0.973), "padim": (0.890, 0.955), "spade": (0.750, 0.940)}


def _defaults_on(
    method: str, params: dict, data: Path, n_good: int, n_defective: int, floors: tuple[float, float]
) -> None:
    split = mvtec_category(data)
    detector = make_detector(method, **params)
    assert detector.backbone == "tf_efficientnet_lite0"
    assert detector.image_size == (PATCHCORE_IMAGE_SIZE if method == "patchcore" else 256)
    meta = fit_detector(detector, split.train)
    result = evaluate_detector(detector, split, float(meta["threshold"]))
    assert result["n_good"] == n_good and result["n_defective"] == n_defective and result["n_failed"] == 0
    summary = f"{method}: image AUROC {result['image_auroc']:.4f}, pixel AUROC {result['pixel_auroc']:.4f}"
    assert result["image_auroc"] >= floors[0], summary
    assert result["pixel_auroc"] >= floors[1], summary


@pytest.mark.parametrize("method", sorted(FLOORS))
def test_method_defaults_on_bottle(method: str, bottle: Path) -> None:
    params, image_floor, pixel_floor = FLOORS[method]
    _defaults_on(method, params, bottle, 20, 63, (image_floor, pixel_floor))


@pytest.mark.parametrize("method", sorted(PILL_FLOORS))
def test_method_defaults_on_pill(method: str, pill: Path) -> None:
    _defaults_on(method, {}, pill, 26, 141, PILL_FLOORS[method])
