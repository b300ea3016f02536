"""SPADE against brute-force kNN references, on a tiny fixed random CNN (no pretrained weights)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import SIZE, TinyExtractor, textures

from defectscope.detectors import base as base_module
from defectscope.detectors.spade import SPADE
from defectscope.errors import DefectscopeError, NotFittedError


@pytest.fixture(scope="module")
def train() -> torch.Tensor:
    return textures(20, seed=1)


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return textures(4, seed=2)


def make(**params) -> SPADE:
    params = {"image_size": SIZE, "k": 5, "top_k": 3, "global_layer": "maps", **params}
    det = SPADE(**params)
    det.set_extractor(TinyExtractor())
    return det


@pytest.fixture(scope="module")
def fitted(train: torch.Tensor) -> SPADE:
    return make().fit(train)


def brute_embed(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Global features (N, 16) and embeddings (N, 256, 36) in float64, computed independently."""
    with torch.no_grad():
        feats = TinyExtractor()(x)
    glob = feats[-1].mean(dim=(2, 3)).double().numpy()
    up = torch.cat([F.interpolate(f, size=(16, 16), mode="nearest") for f in feats], dim=1)
    return glob, up.permute(0, 2, 3, 1).reshape(len(x), 256, 36).double().numpy()


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def test_shapes_and_dtypes(fitted: SPADE, test_images: torch.Tensor) -> None:
    pred = fitted.predict(test_images)
    assert pred.scores.shape == (4,) and pred.maps.shape == (4, SIZE, SIZE)
    assert pred.scores.dtype == np.float32 and pred.maps.dtype == np.float32
    assert fitted.training_scores().shape == (20,)
    sd = fitted.state_dict()
    assert sd["train_global"].shape == (20, 16) and sd["train_maps"].shape == (20, 16, 16, 36)


def test_matches_brute_force_knn(fitted: SPADE, train: torch.Tensor, test_images: torch.Tensor) -> None:
    tr_glob, _ = brute_embed(train)
    te_glob, te_emb = brute_embed(test_images)
    tr_emb = fitted.train_maps_.double().numpy().reshape(20, 256, 36)  # the stored (float16) gallery
    d = pairwise(te_glob, tr_glob)
    order = np.argsort(d, axis=1)
    scores = np.take_along_axis(d, order, 1)[:, :5].mean(axis=1)  # k = 5
    patch = np.stack(
        [pairwise(te_emb[b], tr_emb[order[b, :3]].reshape(-1, 36)).min(axis=1) for b in range(4)]
    )  # top_k = 3 images in the gallery
    ref_maps = fitted._finish_maps(torch.from_numpy(patch).float().view(4, 16, 16)).numpy()
    pred = fitted.predict(test_images)
    np.testing.assert_allclose(pred.scores, scores, rtol=1e-4)
    np.testing.assert_allclose(pred.maps, ref_maps, rtol=1e-3, atol=1e-4)


def test_float16_storage_changes_maps_negligibly(fitted: SPADE, train: torch.Tensor, test_images: torch.Tensor) -> None:
    exact = make().fit(train)
    exact.train_maps_ = exact._embed(train)[1]  # the same gallery kept in float32
    assert fitted.train_maps_.dtype == torch.float16 and exact.train_maps_.dtype == torch.float32
    a, b = fitted.predict(test_images).maps, exact.predict(test_images).maps
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()


def test_not_fitted_errors(test_images: torch.Tensor) -> None:
    det = make()
    with pytest.raises(NotFittedError):
        det.predict(test_images)
    with pytest.raises(NotFittedError):
        det.training_scores()


def test_state_round_trip_gives_identical_predictions(fitted: SPADE, test_images: torch.Tensor) -> None:
    fresh = make()
    fresh.load_state(fitted.state_dict())
    a, b = fitted.predict(test_images), fresh.predict(test_images)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    assert np.array_equal(fresh.training_scores(), fitted.training_scores())


def test_deterministic_and_invariant_to_batch_size(
    fitted: SPADE, train: torch.Tensor, test_images: torch.Tensor
) -> None:
    streamed = make().fit(iter([train[:3], train[3:11], train[11:]]))
    assert torch.equal(streamed.train_maps_, fitted.train_maps_)
    ref = fitted.predict(test_images)
    got = streamed.predict([test_images[i : i + 1] for i in range(4)])
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("i", [0, 13])
def test_training_scores_are_leave_one_out(fitted: SPADE, train: torch.Tensor, i: int) -> None:
    without = make().fit(torch.cat([train[:i], train[i + 1 :]]))
    refit_score = without.predict(train[i : i + 1]).scores[0]
    assert fitted.training_scores()[i] == pytest.approx(refit_score, rel=1e-4)
    assert fitted.predict(train[i : i + 1]).scores[0] < refit_score  # in-sample includes a zero distance


def test_k_is_clipped_with_a_warning(train: torch.Tensor, test_images: torch.Tensor, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="defectscope.detectors.spade"):
        det = make(k=50, top_k=30).fit(train[:6])
    assert "k=50" in caplog.text and "top_k=30" in caplog.text
    te_glob, _ = brute_embed(test_images)
    tr_glob, _ = brute_embed(train[:6])
    np.testing.assert_allclose(det.predict(test_images).scores, pairwise(te_glob, tr_glob).mean(axis=1), rtol=1e-4)
    d = pairwise(tr_glob, tr_glob)
    loo = np.array([np.delete(d[i], i).mean() for i in range(6)])  # k clipped to the 5 others
    np.testing.assert_allclose(det.training_scores(), loo, rtol=1e-4)


def test_planted_bright_square_scores_higher_and_map_peaks_inside(fitted: SPADE, test_images: torch.Tensor) -> None:
    defect = test_images.clone()
    defect[:, :, 36:52, 8:24] = 1.5  # bright 16 x 16 square
    good, bad = fitted.predict(test_images), fitted.predict(defect)
    assert (bad.scores > good.scores).all()
    assert (bad.maps.max(axis=(1, 2)) > good.maps.max(axis=(1, 2))).all()
    for m in bad.maps:
        y, x = np.unravel_index(np.argmax(m), m.shape)
        assert 32 <= y < 56 and 4 <= x < 28, (y, x)


def test_invalid_parameters(train: torch.Tensor) -> None:
    with pytest.raises(DefectscopeError, match="k must be"):
        make(k=0).fit(train)
    with pytest.raises(DefectscopeError, match="top_k must be"):
        make(top_k=2.5).fit(train)
    with pytest.raises(DefectscopeError, match="at least 2 training images"):
        make().fit(train[:1])


def test_default_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extractor is asked for the pixel-level layers plus the last stage (the global feature)."""
    built: list[tuple] = []

    class Built(Exception):
        pass

    def fake_extractor(
        backbone: str, layers: list[str] | None = None, weights: str | None = None, normalization: str = "weights"
    ) -> TinyExtractor:
        built.append((backbone, layers))
        raise Built

    monkeypatch.setattr(base_module, "build_extractor", fake_extractor)
    for det in (
        SPADE(backbone="wide_resnet50_2", image_size=SIZE),
        SPADE(image_size=SIZE),
        SPADE(image_size=SIZE, layers=["blocks.2", "blocks.4"]),
        SPADE(image_size=SIZE, global_layer="maps"),
    ):
        with pytest.raises(Built):
            det.extractor
    assert built == [
        ("wide_resnet50_2", ["layer1", "layer2", "layer3", "layer4"]),
        ("tf_efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
        ("tf_efficientnet_lite0", ["blocks.2", "blocks.4", "blocks.6"]),
        ("tf_efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4"]),
    ]


def test_pixel_search_with_overlapping_galleries_matches_brute_force(fitted: SPADE) -> None:
    g = torch.Generator().manual_seed(7)
    queries = torch.randn(3, 256, 36, generator=g) * 0.5
    gallery = torch.tensor([[0, 5, 9], [5, 9, 2], [11, 12, 13]])  # images 0 and 1 share two
    fitted._train_sq = None  # recomputed from the stored maps
    got = fitted._nearest_patch_distances(queries, gallery)
    bank = fitted.train_maps_.double().numpy().reshape(20, 256, 36)
    for b in range(3):
        ref = pairwise(queries[b].double().numpy(), bank[gallery[b].numpy()].reshape(-1, 36)).min(axis=1)
        np.testing.assert_allclose(got[b].numpy(), ref, rtol=1e-4, atol=1e-4)


def test_global_feature_pools_the_backbones_last_stage() -> None:
    """Paper sec. 3.1 and ind_knn_ad: the image-level feature is the pooled final stage, not the deepest
    pixel-level layer (blocks.4 gave image AUROC 0.980 on bottle; see the README)."""
    det = SPADE(image_size=64, k=1, top_k=1)
    det.fit(torch.rand(3, 3, 64, 64))
    assert det.layers == ["blocks.1", "blocks.2", "blocks.4"] and "blocks.6" in det.extractor.layers
    assert det.train_global_.shape == (3, 320)  # tf_efficientnet_lite0's last stage has 320 channels
    with pytest.raises(DefectscopeError, match="global layer"):
        SPADE(image_size=SIZE).set_extractor(TinyExtractor())
