"""The detector contract, checked the same way for every method (real pretrained backbone, tiny images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope import io
from defectscope.data.images import load_image, preprocess
from defectscope.data.layouts import mvtec_category
from defectscope.detectors import METHODS, make_detector
from defectscope.detectors.base import DEFAULT_BACKBONE, Detector
from defectscope.errors import DefectscopeError, NotFittedError
from defectscope.evaluation.metrics import image_auroc
from defectscope.fitting import fit_detector

SIZE = 96
# small data: PatchCore keeps a larger share of its few patches; PaDiM keeps 48 random channels (fast fit)
EXTRA = {"patchcore": {"coreset_ratio": 0.25}, "padim": {"d_reduced": 48}, "spade": {}}


def _build(method: str, **over: object) -> Detector:
    return make_detector(method, image_size=SIZE, **{**EXTRA[method], **over})


def _tensor(detector: Detector, paths: list[Path]) -> torch.Tensor:
    mean, std = detector.input_stats
    return torch.stack([preprocess(load_image(p), SIZE, mean, std) for p in paths])


@pytest.fixture(scope="module", params=sorted(METHODS))
def fitted(request: pytest.FixtureRequest, synthetic_category: Path) -> dict:
    """A detector of each method fitted on the synthetic category, with its test tensors and metadata."""
    method = request.param
    split = mvtec_category(synthetic_category)
    detector = _build(method)
    meta = fit_detector(detector, split.train, batch_size=8)
    images = _tensor(detector, [s.path for s in split.test])
    labels = np.array([s.label for s in split.test])
    return {
        "method": method,
        "detector": detector,
        "meta": meta,
        "split": split,
        "images": images,
        "labels": labels,
        "prediction": detector.predict(images),
    }


def test_default_backbone_is_the_offline_one(fitted: dict) -> None:
    assert fitted["detector"].backbone == DEFAULT_BACKBONE == "tf_efficientnet_lite0"


def test_prediction_shapes_and_dtypes(fitted: dict) -> None:
    pred = fitted["prediction"]
    n = len(fitted["split"].test)
    assert pred.scores.shape == (n,) and pred.scores.dtype == np.float32
    assert pred.maps.shape == (n, SIZE, SIZE) and pred.maps.dtype == np.float32
    assert np.isfinite(pred.scores).all() and np.isfinite(pred.maps).all()
    # batches or one tensor: the same numbers
    batched = fitted["detector"].predict(iter(fitted["images"].split(7)))
    np.testing.assert_allclose(batched.scores, pred.scores, rtol=1e-5, atol=1e-6)


def test_training_scores_one_per_training_image(fitted: dict) -> None:
    scores = fitted["detector"].training_scores()
    assert scores.shape == (len(fitted["split"].train),) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert fitted["meta"]["threshold"] == pytest.approx(float(np.quantile(scores.astype(np.float64), 0.99)))


def test_synthetic_image_auroc(fitted: dict) -> None:
    auroc = image_auroc(fitted["labels"], fitted["prediction"].scores)
    assert auroc >= 0.9, f"{fitted['method']}: image AUROC {auroc:.3f} on the synthetic category"


def test_same_seed_same_scores(fitted: dict) -> None:
    again = _build(fitted["method"])
    again.fit(_tensor(again, fitted["split"].train))
    pred = again.predict(fitted["images"])
    np.testing.assert_array_equal(pred.scores, fitted["prediction"].scores)
    np.testing.assert_array_equal(again.training_scores(), fitted["detector"].training_scores())


def test_save_load_round_trip_is_exact(fitted: dict, tmp_path: Path) -> None:
    path = io.save_model(tmp_path / "m.dsmodel", fitted["detector"], fitted["meta"])
    loaded, meta = io.load_model(path)
    assert type(loaded) is type(fitted["detector"]) and meta["method"] == fitted["method"]
    assert loaded.get_params() == fitted["detector"].get_params()
    pred = loaded.predict(fitted["images"])
    np.testing.assert_array_equal(pred.scores, fitted["prediction"].scores)
    np.testing.assert_array_equal(pred.maps, fitted["prediction"].maps)
    np.testing.assert_array_equal(loaded.training_scores(), fitted["detector"].training_scores())


def test_get_params_round_trip(fitted: dict) -> None:
    params = fitted["detector"].get_params()
    rebuilt = make_detector(fitted["method"], **params)
    assert rebuilt.get_params() == params
    assert not rebuilt.is_fitted


@pytest.mark.parametrize("method", sorted(METHODS))
def test_not_fitted_errors(method: str, tmp_path: Path) -> None:
    detector = _build(method)
    images = torch.zeros(2, 3, SIZE, SIZE)
    for call in (
        lambda: detector.predict(images),
        detector.training_scores,
        detector.state_dict,
        lambda: io.save_model(tmp_path / "m.dsmodel", detector, {}),
    ):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()
    assert not (tmp_path / "m.dsmodel").exists()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_parameter_rejected(method: str) -> None:
    with pytest.raises(DefectscopeError, match="bogus_param"):
        make_detector(method, bogus_param=1)
