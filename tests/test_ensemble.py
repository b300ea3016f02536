"""Backbone ensembles ("a+b"): features, per-member normalisation, the model file, and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope.cli.commands import main
from defectscope.data.loader import iter_batches
from defectscope.detectors import make_detector
from defectscope.detectors.patchcore import PatchCore
from defectscope.errors import BackboneError
from defectscope.features.backbones import (
    EnsembleExtractor,
    FeatureExtractor,
    available_layers,
    build_extractor,
    concat_on_grid,
    default_layers,
)
from defectscope.fitting import fit_detector
from defectscope.io import load_model, read_metadata, save_model

LITE02 = "tf_efficientnet_lite0+tf_efficientnet_lite2"
SIZE = 64


@pytest.fixture(scope="module")
def ensemble() -> EnsembleExtractor:
    """lite0 + lite2 with their packaged offline weights, the default layers."""
    extractor = build_extractor(LITE02)
    assert isinstance(extractor, EnsembleExtractor)
    return extractor


def test_features_are_the_members_features_concatenated(ensemble: EnsembleExtractor) -> None:
    lite0 = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])
    lite2 = FeatureExtractor("tf_efficientnet_lite2", ["blocks.2", "blocks.4"])
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        got, a, b = ensemble(x), lite0(x), lite2(x)
    assert ensemble.layers == ("blocks.2", "blocks.4") == lite0.layers == lite2.layers
    assert ensemble.channels == (40 + 48, 112 + 120)
    assert ensemble.channels == tuple(c0 + c2 for c0, c2 in zip(lite0.channels, lite2.channels))
    assert ensemble.strides == lite0.strides == (8, 16)
    for f, f0, f2, c, s in zip(got, a, b, ensemble.channels, ensemble.strides):
        assert f.shape == (2, c, SIZE // s, SIZE // s)
        assert torch.equal(f, torch.cat([f0, f2], dim=1))  # exact: same input, same networks
    assert ensemble.mean == ensemble.std == (0.5, 0.5, 0.5)
    info = ensemble.weights_info
    assert info["source"] == "ensemble"
    assert [m["backbone"] for m in info["members"]] == ["tf_efficientnet_lite0", "tf_efficientnet_lite2"]
    assert all(m["source"] == "package" and m["sha256"] for m in info["members"])


def test_layer_names_are_those_every_member_has() -> None:
    assert available_layers(LITE02) == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert default_layers(LITE02) == ["blocks.2", "blocks.4"]
    block = build_extractor(LITE02, ["blocks.2.0"], weights="none")
    assert block.layers == ("blocks.2.0",) and block.channels == (40 + 48,)


def test_maps_on_another_grid_are_resampled_bilinearly_to_the_first_members() -> None:
    a = [torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4)]
    b = [torch.randn(1, 5, 7, 7), torch.randn(1, 1, 4, 4)]
    out = concat_on_grid([a, b])
    assert [tuple(o.shape) for o in out] == [(1, 7, 8, 8), (1, 4, 4, 4)]
    assert torch.equal(out[0][:, :2], a[0]) and torch.equal(out[1], torch.cat([a[1], b[1]], dim=1))
    expected = torch.nn.functional.interpolate(b[0], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(out[0][:, 2:], expected)


def test_members_with_other_statistics_are_normalised_inside_the_extractor() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE)  # normalised with the first member's (ImageNet) statistics
    mixed = build_extractor("efficientnet_b0+tf_efficientnet_lite0", ["blocks.2"], weights="none")
    assert mixed.mean == (0.485, 0.456, 0.406)
    b0, lite0 = mixed.members
    raw = x * torch.tensor(mixed.std).view(1, 3, 1, 1) + torch.tensor(mixed.mean).view(1, 3, 1, 1)
    with torch.inference_mode():
        got = mixed(x)[0]
        torch.testing.assert_close(got[:, :40], b0(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(got[:, 40:], lite0((raw - 0.5) / 0.5)[0])
    same = build_extractor(
        "efficientnet_b0+tf_efficientnet_lite0", ["blocks.2"], weights="none", normalization="imagenet"
    )  # every member sees ImageNet-normalised input
    with torch.inference_mode():
        assert torch.equal(same(x)[0][:, 40:], same.members[1](x)[0])


def test_patchcore_fit_save_load_round_trip(synthetic_category: Path, tmp_path: Path) -> None:
    detector = PatchCore(backbone=LITE02, image_size=SIZE, coreset_ratio=0.25, seed=3)
    train = sorted((synthetic_category / "train" / "good").glob("*.png"))[:8]
    meta = fit_detector(detector, train, batch_size=8)
    assert detector.extractor.channels == (88, 232)
    path = save_model(tmp_path / "ensemble.dsmodel", detector, meta)
    loaded, saved = load_model(path)
    assert saved["backbone"] == LITE02 and saved["params"]["backbone"] == LITE02
    assert saved["weights"]["source"] == "ensemble" and len(saved["weights"]["members"]) == 2
    assert read_metadata(path)["sha256"]
    test = sorted((synthetic_category / "test").rglob("*.png"))[:6]
    mean, std = loaded.input_stats
    images = torch.cat([b.images for b in iter_batches(test, SIZE, mean, std, batch_size=8)])
    a, b = detector.predict(images), loaded.predict(images)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    assert isinstance(loaded.extractor, EnsembleExtractor) and loaded.extractor.channels == (88, 232)


@pytest.mark.parametrize("method", ["padim", "spade"])
def test_padim_and_spade_run_on_an_ensemble(method: str) -> None:
    images = torch.rand(4, 3, SIZE, SIZE)
    detector = make_detector(
        method, backbone=LITE02, image_size=SIZE, weights="none", **({"k": 2, "top_k": 2} if method == "spade" else {})
    )
    result = detector.fit(images).predict(images[:2])
    assert result.scores.shape == (2,) and result.maps.shape == (2, SIZE, SIZE)
    assert np.isfinite(result.scores).all()


@pytest.mark.parametrize(
    "backbone, message",
    [
        (
            "tf_efficientnet_lite0+tf_efficientnet_lit2",
            r"unknown backbone 'tf_efficientnet_lit2' in ensemble .*tf_efficientnet_lite2.*offline weights: "
            r"tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2",
        ),
        ("tf_efficientnet_lite0+tf_efficientnet_lite1+tf_efficientnet_lite2+efficientnet_b0", r"4 members; at most 3"),
        ("tf_efficientnet_lite0+tf_efficientnet_lite0", r"repeats tf_efficientnet_lite0"),
        ("tf_efficientnet_lite0++tf_efficientnet_lite2", r"empty member"),
        ("tf_efficientnet_lite0+resnet18", r"share no layer names .*resnet18: act1, layer1"),
    ],
)
def test_bad_ensembles_are_refused_with_a_reason(backbone: str, message: str) -> None:
    with pytest.raises(BackboneError, match=message):
        build_extractor(backbone, weights="none")


def test_unknown_layer_lists_the_layers_every_member_has() -> None:
    with pytest.raises(
        BackboneError,
        match=r"unknown layer 'layer2' .*valid layers: blocks.0, blocks.1, blocks.2, "
        r"blocks.4, blocks.6",
    ):
        build_extractor(LITE02, ["blocks.2", "layer2"], weights="none")


def test_one_weights_file_for_an_ensemble_is_refused(synthetic_category: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(BackboneError, match=r"ensemble of 2 models: leave --weights out"):
        build_extractor(LITE02, weights=str(tmp_path / "w.pth"))
    code = main(
        [
            "fit",
            str(synthetic_category),
            "-o",
            str(tmp_path / "m.dsmodel"),
            "--backbone",
            LITE02,
            "--weights",
            str(tmp_path / "w.pth"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "is an ensemble of 2 models" in err and len(err.strip().splitlines()) == 1
