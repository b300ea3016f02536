"""Offline weights: packaged lite conversion, its cache, local files, and the hub fallback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope.errors import BackboneError
from defectscope.features import weights as W
from defectscope.features.backbones import FeatureExtractor

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion cache shared by the tests that only need converted weights."""
    return tmp_path_factory.mktemp("defectscope-cache")


@pytest.fixture
def use_shared_cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(W.CACHE_ENV, str(shared_cache))
    return shared_cache


def _chelsea_224() -> torch.Tensor:
    """skimage's cat: shorter side resized to 256 (= 224 / 0.875), centre crop 224, scaled to [-1, 1]."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea())
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) / 0.5).unsqueeze(0)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_packaged_classifier_sees_a_cat(name: str, use_shared_cache: Path) -> None:
    loaded = W.build_classifier(name)
    assert loaded.mean == loaded.std == (0.5, 0.5, 0.5)
    assert loaded.info["source"] == "package" and len(loaded.info["sha256"]) == 64
    json.dumps(loaded.info)
    with torch.inference_mode():
        logits = loaded.model(_chelsea_224())
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) in CAT_CLASSES


def test_random_init_is_not_a_cat_detector() -> None:
    """Control for the test above: the same pipeline with random weights gives a flat output."""
    loaded = W.build_classifier("tf_efficientnet_lite0", weights="none")
    assert loaded.info == {"source": "none"}
    with torch.inference_mode():
        probs = loaded.model(_chelsea_224()).softmax(-1)
    assert float(probs[0, sorted(CAT_CLASSES)].sum()) < 0.5


def test_name_mapping_agrees_with_tensor_order() -> None:
    """Name-based conversion lands every tensor where the positional pairing would put it."""
    raw = W.read_state_dict(W.packaged_file("tf_efficientnet_lite0"))
    reference = W._reference("tf_efficientnet_lite0")
    converted = W.convert_efficientnet_pytorch(raw, reference)
    ref_keys = list(reference.state_dict())
    assert list(converted) == ref_keys
    for (src_key, src), (dst_key, dst) in zip(raw.items(), converted.items()):
        assert src is dst, (src_key, dst_key)
        assert tuple(src.shape) == tuple(reference.state_dict()[dst_key].shape)


def test_conversion_rejects_wrong_model_size() -> None:
    raw = W.read_state_dict(W.packaged_file("tf_efficientnet_lite0"))
    with pytest.raises(BackboneError, match="tf_efficientnet_lite1|shape|map"):
        W.to_timm_state_dict(raw, "tf_efficientnet_lite1", "lite0 weights")


def test_cache_reused_then_rebuilt_when_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    first, info = W.packaged_state_dict("tf_efficientnet_lite0")
    cached = tmp_path / "weights" / "tf_efficientnet_lite0.safetensors"
    assert cached.is_file() and info["cache"] == str(cached)
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]
    stamp = cached.stat().st_mtime_ns

    again, info2 = W.packaged_state_dict("tf_efficientnet_lite0")
    assert cached.stat().st_mtime_ns == stamp  # read, not rewritten
    assert info2["sha256"] == info["sha256"]
    assert all(torch.equal(first[k], again[k]) for k in first)

    cached.write_bytes(b"not a safetensors file")
    rebuilt, _ = W.packaged_state_dict("tf_efficientnet_lite0")
    assert cached.stat().st_size > 1_000_000
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)


def test_cache_with_wrong_tensors_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    good, _ = W.packaged_state_dict("tf_efficientnet_lite0")
    cached = tmp_path / "weights" / "tf_efficientnet_lite0.safetensors"
    from safetensors import safe_open

    with safe_open(str(cached), framework="pt") as fh:
        meta = fh.metadata()
    broken = load_file(str(cached))
    broken.pop("conv_stem.weight")
    save_file(broken, str(cached), metadata=meta)
    rebuilt, _ = W.packaged_state_dict("tf_efficientnet_lite0")
    assert torch.equal(rebuilt["conv_stem.weight"], good["conv_stem.weight"])
    assert "conv_stem.weight" in load_file(str(cached))


def test_pickled_object_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(str(marker))}, path)
    with pytest.raises(BackboneError, match="evil.pth.*unpickle"):
        W.read_state_dict(path)
    assert not marker.exists()


class _Payload:
    """Unpickling this object would create a file; weights_only loading must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_touch, (self.path,))


def _touch(path: str) -> None:
    Path(path).touch()


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="not found.*nope.pth"):
        W.read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(BackboneError, match="bad.safetensors"):
        W.read_state_dict(bad)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(BackboneError, match="no tensors"):
        W.read_state_dict(empty)


def test_wrapped_and_prefixed_state_dict(tmp_path: Path) -> None:
    sd = {"module.a.weight": torch.ones(2), "module.b": torch.zeros(1)}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 7}, path)
    out = W.read_state_dict(path)
    assert set(out) == {"a.weight", "b"}


def test_hub_offline_fails_fast_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "_hub_reachable", lambda url: False)
    monkeypatch.setattr(W, "_hub_cached_file", lambda cfg: None)
    start = time.perf_counter()
    with pytest.raises(BackboneError, match="could not be downloaded.*--weights FILE"):
        FeatureExtractor("resnet18")
    assert time.perf_counter() - start < 10


def test_hub_download_error_becomes_backbone_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    real = timm.create_model

    def fake(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("connection refused")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(W, "_hub_reachable", lambda url: True)
    monkeypatch.setattr(timm, "create_model", fake)
    with pytest.raises(BackboneError, match="resnet18.*could not be downloaded.*connection refused.*--weights"):
        W.create_model("resnet18", features_only=True)


def test_hub_cache_used_when_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline but already in the Hugging Face cache: those weights are loaded, not random ones."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))
    monkeypatch.setattr(W, "_hub_reachable", lambda url: False)
    monkeypatch.setattr(W, "_hub_cached_file", lambda cfg: str(path))
    loaded = W.create_model("resnet18")
    assert loaded.info["source"] == "timm-hub" and loaded.info["file"] == str(path)
    assert torch.equal(loaded.model.conv1.weight, ref.conv1.weight)


def test_none_weights_are_explicit() -> None:
    loaded = W.create_model("resnet18", weights="none", features_only=True)
    assert loaded.info == {"source": "none"}
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406))
    assert os.environ.get("HF_HUB_OFFLINE") in (None, "", "0", "1")  # untouched by the library
