"""FeatureExtractor: layer names, shapes, truncation, and weights from local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from defectscope.errors import BackboneError
from defectscope.features import weights as W
from defectscope.features.backbones import FeatureExtractor, available_layers, default_layers


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    """lite0 with its packaged weights, converted into a throwaway cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(W.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        return FeatureExtractor("tf_efficientnet_lite0")


def test_layer_names_and_defaults() -> None:
    assert available_layers("tf_efficientnet_lite0") == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert available_layers("resnet18") == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert default_layers("tf_efficientnet_lite0") == ["blocks.2", "blocks.4"]
    assert default_layers("wide_resnet50_2") == ["layer2", "layer3"]
    assert default_layers("convnext_tiny") == ["stages.1", "stages.2"]  # strides 8 and 16
    for name in default_layers("convnext_tiny"):
        assert name in available_layers("convnext_tiny")


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(BackboneError, match=r"'layer9'.*act1, layer1, layer2, layer3, layer4"):
        FeatureExtractor("resnet18", ["layer2", "layer9"], weights="none")
    with pytest.raises(BackboneError, match="valid layers"):
        FeatureExtractor("resnet18", [], weights="none")


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet81'.*resnet18"):
        FeatureExtractor("resnet81", weights="none")
    with pytest.raises(BackboneError, match="unknown backbone"):
        available_layers("no_such_net_xyz")


def test_layers_sorted_by_depth_and_deduplicated() -> None:
    fe = FeatureExtractor("resnet18", ["layer3", "layer1", "layer3"], weights="none")
    assert fe.layers == ("layer1", "layer3")
    assert fe.channels == (64, 256) and fe.strides == (4, 16)


def test_packaged_lite0_shapes_match_report(lite0: FeatureExtractor) -> None:
    assert lite0.layers == ("blocks.2", "blocks.4")
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)
    assert lite0.weights_info["source"] == "package"
    json.dumps(lite0.weights_info)
    x = torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        feats = lite0(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 256 // s, 256 // s) for c, s in zip(lite0.channels, lite0.strides)
    ]
    assert lite0.channels == (40, 112) and lite0.strides == (8, 16)
    assert all(f.dtype == torch.float32 and f.is_contiguous() for f in feats)


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "resnet18"])
def test_all_layers_shapes(backbone: str) -> None:
    fe = FeatureExtractor(backbone, available_layers(backbone), weights="none")
    with torch.inference_mode():
        feats = fe(torch.randn(1, 3, 256, 256))
    assert [f.shape[1] for f in feats] == list(fe.channels)
    assert [256 // f.shape[-1] for f in feats] == list(fe.strides)
    assert [256 // f.shape[-2] for f in feats] == list(fe.strides)


def test_truncated_lite0_equals_full_network(lite0: FeatureExtractor) -> None:
    """Unused stages are dropped, and the features are those of timm's untruncated model."""
    assert len(lite0.model.blocks) == 5  # blocks.0 .. blocks.4 of 7
    full = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3)).eval()
    assert len(full.blocks) == 7
    missing, _ = full.load_state_dict(lite0.model.state_dict(), strict=False)
    assert all(k.startswith(("blocks.5", "blocks.6")) for k in missing)
    x = torch.randn(2, 3, 128, 160)
    with torch.inference_mode():
        ours, ref = lite0(x), full(x)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_stays_in_eval_mode(lite0: FeatureExtractor) -> None:
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())


def _reference_features(model: torch.nn.Module, x: torch.Tensor, layers: list[str]) -> list[torch.Tensor]:
    """Features of a full ResNet by running its modules by hand (independent of timm's wrappers)."""
    out = {}
    act = model.act1 if hasattr(model, "act1") else model.relu  # timm / torchvision naming
    h = act(model.bn1(model.conv1(x)))
    h = model.maxpool(h)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        h = getattr(model, name)(h)
        out[name] = h
    return [out[n] for n in layers]


def test_torchvision_pth_and_timm_safetensors(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    for bn in (m for m in tv.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial statistics so a wrong load shows
        bn.running_var.uniform_(0.5, 2.0)
    tv_path = tmp_path / "resnet18_tv.pth"
    torch.save(tv.state_dict(), tv_path)

    timm_model = timm.create_model("resnet18", pretrained=False).eval()
    timm_path = tmp_path / "resnet18_timm.safetensors"
    save_file(timm_model.state_dict(), str(timm_path))

    x = torch.randn(2, 3, 128, 128)
    layers = ["layer2", "layer3"]
    for path, ref_model in ((tv_path, tv), (timm_path, timm_model)):
        fe = FeatureExtractor("resnet18", layers, weights=str(path))
        assert fe.weights_info["source"] == "file"
        assert fe.weights_info["sha256"] == W.sha256_file(path)
        json.dumps(fe.weights_info)
        with torch.inference_mode():
            ours = fe(x)
            ref = _reference_features(ref_model, x, layers)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_file_without_classifier_and_with_wrapper(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "wrapped.pt"
    torch.save({"model": sd, "epoch": 3}, path)
    fe = FeatureExtractor("resnet18", ["layer1"], weights=str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fe(x)[0], _reference_features(model, x, ["layer1"])[0], rtol=1e-4, atol=1e-4)


def test_mismatched_file_names_the_file(tmp_path: Path) -> None:
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    wrong_shape = dict(sd, **{"layer2.0.conv1.weight": torch.zeros(3, 3, 3, 3)})
    path = tmp_path / "wrong_shape.pth"
    torch.save(wrong_shape, path)
    with pytest.raises(BackboneError, match=r"wrong_shape\.pth.*shape.*layer2\.0\.conv1\.weight"):
        FeatureExtractor("resnet18", weights=str(path))

    missing = {k: v for k, v in sd.items() if not k.startswith("layer3")}
    path = tmp_path / "missing.pth"
    torch.save(missing, path)
    with pytest.raises(BackboneError, match=r"missing\.pth.*missing keys.*layer3"):
        FeatureExtractor("resnet18", weights=str(path))

    other = timm.create_model("resnet34", pretrained=False).state_dict()
    path = tmp_path / "resnet34.safetensors"
    from safetensors.torch import save_file

    save_file(other, str(path))
    with pytest.raises(BackboneError, match=r"resnet34\.safetensors.*unexpected keys"):
        FeatureExtractor("resnet18", weights=str(path))


def test_lite_file_in_efficientnet_pytorch_names(lite0: FeatureExtractor) -> None:
    """The package's own .pth passed as a file loads like the default source."""
    fe = FeatureExtractor("tf_efficientnet_lite0", weights=str(W.packaged_file("tf_efficientnet_lite0")))
    assert fe.weights_info["source"] == "file"
    assert fe.mean == (0.5, 0.5, 0.5)
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        for a, b in zip(fe(x), lite0(x)):
            assert torch.equal(a, b)
