"""The model file: exact round trip, atomic writes, clear errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from defectscope.detectors.patchcore import PatchCore
from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.io import load_model, read_metadata, save_model, update_metadata
from defectscope.version import MODEL_FORMAT_VERSION, __version__

SIZE = 64


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    images = torch.rand(6, 3, SIZE, SIZE)
    det = PatchCore(image_size=SIZE, coreset_ratio=0.2, seed=1).fit(images)
    path = tmp_path_factory.mktemp("model") / "m.dsmodel"
    save_model(path, det, {"threshold": 1.5, "training": {"n_images": 6}})
    return det, path, images


def test_round_trip_gives_identical_scores(small_model):
    det, path, images = small_model
    loaded, meta = load_model(path)
    a, b = det.predict(images), loaded.predict(images)
    assert np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.maps, b.maps)
    assert meta["method"] == "patchcore"
    assert meta["threshold"] == 1.5
    for key in (
        "format_version",
        "package_version",
        "backbone",
        "weights",
        "layers",
        "image_size",
        "normalization",
        "seed",
        "params",
    ):
        assert key in meta
    assert meta["params"]["coreset_ratio"] == 0.2
    assert meta["weights"]["source"] == "package"


def test_truncated_file_fails_clearly(small_model, tmp_path):
    _, path, _ = small_model
    data = path.read_bytes()
    bad = tmp_path / "truncated.dsmodel"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"truncated\.dsmodel.*(truncated|corrupt)"):
        load_model(bad)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"hello world, not a model", "not a defectscope model"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a defectscope model"),
    ],
)
def test_foreign_files_fail_clearly(tmp_path, content, reason):
    bad = tmp_path / "foreign.bin"
    bad.write_bytes(content)
    with pytest.raises(ModelFileError, match=reason):
        load_model(bad)


def test_safetensors_without_our_metadata(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="not a defectscope model"):
        load_model(other)


def test_newer_format_version_is_refused(small_model, tmp_path):
    _, path, _ = small_model
    copy = tmp_path / "future.dsmodel"
    copy.write_bytes(path.read_bytes())
    update_metadata(copy, {"format_version": 99, "package_version": "9.1.0"})
    expected = f"made by defectscope 9.1.0 (format 99); this is {__version__} (format {MODEL_FORMAT_VERSION}): upgrade"
    with pytest.raises(ModelFileError, match=re.escape(expected)):
        read_metadata(copy)
    with pytest.raises(ModelFileError, match="upgrade"):
        load_model(copy)


def test_a_newer_model_file_counts_as_a_model_file_for_overwriting(small_model, tmp_path):
    from defectscope.io import is_model_file

    _, path, _ = small_model
    copy = tmp_path / "future.dsmodel"
    copy.write_bytes(path.read_bytes())
    update_metadata(copy, {"format_version": 99, "package_version": "9.1.0"})
    assert is_model_file(copy) and is_model_file(path)
    (tmp_path / "photo.png").write_bytes(b"not a model")
    assert not is_model_file(tmp_path / "photo.png") and not is_model_file(tmp_path / "absent.dsmodel")


def test_a_parameter_only_a_newer_version_knows_asks_for_an_upgrade(small_model, tmp_path):
    _, path, _ = small_model
    meta = read_metadata(path)
    copy = tmp_path / "future.dsmodel"
    copy.write_bytes(path.read_bytes())
    update_metadata(copy, {"package_version": "9.0.0", "params": {**meta["params"], "future_option": 1}})
    with pytest.raises(ModelFileError, match=re.escape("made by defectscope 9.0.0 (format 1); this is")):
        load_model(copy)
    # the same file from this version or an older one is a damaged file, reported as what it is
    update_metadata(copy, {"package_version": "0.1.0"})
    with pytest.raises(DefectscopeError, match="does not take parameter"):
        load_model(copy)


def test_version_names_the_model_format(capsys):
    from defectscope.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"defectscope {__version__} (model format {MODEL_FORMAT_VERSION})"


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.dsmodel")


def test_crash_while_writing_keeps_the_old_file(small_model, tmp_path, monkeypatch):
    det, path, _ = small_model
    target = tmp_path / "keep.dsmodel"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    import defectscope.io as io_mod

    def exploding_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io_mod, "save_file", exploding_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(target, det, {"threshold": 2.0})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.dsmodel"]


def test_no_pickle_in_model_file(small_model):
    _, path, _ = small_model
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert set(header) - {"__metadata__"} == {
        "memory_bank",
        "bank_image",
        "grid",
        "n_train",
        "training_scores",
        "training_map_max",
    }


def test_normalization_is_saved_and_restored(small_model, tmp_path):
    det, path, _ = small_model
    meta = read_metadata(path)
    assert meta["params"]["normalization"] == det.normalization
    assert meta["normalization"] == {
        "name": det.normalization,
        "mean": list(det.input_stats[0]),
        "std": list(det.input_stats[1]),
    }
    weights_model = tmp_path / "weights.dsmodel"
    images = torch.rand(4, 3, SIZE, SIZE)
    save_model(weights_model, PatchCore(image_size=SIZE, coreset_ratio=0.5, normalization="weights").fit(images), {})
    loaded, meta = load_model(weights_model)
    assert loaded.normalization == "weights"
    assert meta["normalization"]["mean"] == [0.5, 0.5, 0.5]  # EfficientNet-Lite's own statistics


def test_files_from_before_the_normalization_parameter_use_the_weights_statistics(small_model, tmp_path):
    _, path, _ = small_model
    old = tmp_path / "old.dsmodel"
    old.write_bytes(path.read_bytes())
    meta = read_metadata(old)
    params = {k: v for k, v in meta["params"].items() if k != "normalization"}
    update_metadata(old, {"params": params})
    loaded, _ = load_model(old)
    assert loaded.normalization == "weights"
    assert loaded.input_stats == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_rotations_round_trip_and_old_files_load_as_one(small_model, tmp_path):
    _, path, images = small_model
    rotated = PatchCore(image_size=SIZE, coreset_ratio=0.2, seed=1, rotations=3).fit(images)
    saved = tmp_path / "rot.dsmodel"
    save_model(saved, rotated, {})
    loaded, meta = load_model(saved)
    assert meta["params"]["rotations"] == 3 and loaded.rotations == 3
    assert np.array_equal(loaded.predict(images).scores, rotated.predict(images).scores)
    old = tmp_path / "old.dsmodel"
    old.write_bytes(path.read_bytes())
    update_metadata(old, {"params": {k: v for k, v in read_metadata(old)["params"].items() if k != "rotations"}})
    assert load_model(old)[0].rotations == 1


def test_files_from_before_layer_weighting_keep_concatenating_channels(small_model, tmp_path):
    detector, path, images = small_model
    assert PatchCore().layer_weighting == "equal" and detector.layer_weighting == "equal"
    old = tmp_path / "old.dsmodel"
    old.write_bytes(path.read_bytes())
    update_metadata(old, {"params": {k: v for k, v in read_metadata(old)["params"].items() if k != "layer_weighting"}})
    loaded, _ = load_model(old)
    assert loaded.layer_weighting == "channels"
    # the same bank scored with the other weighting gives other scores: the parameter is not ignored
    assert not np.allclose(loaded.predict(images).scores, detector.predict(images).scores)


def test_only_models_an_older_reader_would_misjudge_are_written_in_the_newer_format():
    from defectscope.io import format_version

    assert format_version({}) == 1 and format_version({"judge": None}) == 1
    assert format_version({"judge": {"rule": "region"}}) == MODEL_FORMAT_VERSION == 2
    assert format_version({}, has_roi=True) == 2
    assert format_version({"roi": {"kind": "auto", "applied": False}}) == 1  # auto found no region: nothing to ignore
