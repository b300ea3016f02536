"""The Python API: load, fit, Model.predict on every input kind, Result fields, save."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import defectscope
from defectscope.cli.commands import main
from defectscope.errors import DefectscopeError, ModelFileError


@pytest.fixture(scope="module")
def model_path(synthetic_category, tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "synthetic.dsmodel"
    assert (
        main(
            [
                "fit",
                str(synthetic_category),
                "-o",
                str(path),
                "--image-size",
                "128",
                "--coreset-ratio",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    return path


@pytest.fixture(scope="module")
def model(model_path):
    return defectscope.load(model_path)


def _cli_scores(model_path, paths, capsys) -> dict[str, float]:
    main(["predict", str(model_path), *map(str, paths), "--json", "--no-progress"])
    import json

    out = capsys.readouterr().out
    return {o["path"]: o["score"] for o in map(json.loads, out.splitlines())}


def test_load_describes_the_model(model, model_path):
    info = model.info()
    assert info["method"] == "patchcore" and info["image_size"] == 128 and info["layer_weighting"] == "equal"
    assert info["checksum"] == model.checksum and len(model.checksum) == 64
    assert info["path"] == str(model_path) and info["fitted"]
    assert model.threshold > 0 and model.pixel_threshold > 0
    assert "patchcore" in repr(model)


def test_predict_a_path_matches_the_command_line(model, model_path, synthetic_category, capsys):
    paths = sorted((synthetic_category / "test").rglob("*.png"))[:6]
    expected = _cli_scores(model_path, paths, capsys)
    results = model.predict(paths)
    assert isinstance(results, list) and len(results) == len(paths)
    for path, result in zip(paths, results):
        assert result.ok and result.name == str(path)
        assert result.score == pytest.approx(expected[str(path)], rel=1e-6)
        assert result.judgement == int(result.score >= model.threshold)
        assert result.normalized_score == pytest.approx(result.score / model.threshold)
    one = model.predict(str(paths[0]))
    # alone or in a batch of six: equal to float32 rounding of the batched convolutions
    assert isinstance(one, defectscope.Result) and one.score == pytest.approx(results[0].score, rel=1e-5)


def test_every_in_memory_kind_scores_like_the_file(model, synthetic_category):
    path = sorted((synthetic_category / "test").rglob("*.png"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    base = model.predict(path).score
    kinds = [
        Image.open(path),
        rgb,
        rgb.astype(np.float32) / 255.0,
        rgb.astype(np.uint16) * 257,
        np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
    ]
    for result in model.predict(kinds):
        assert result.ok, result.error
        assert result.score == pytest.approx(base, rel=1e-5)
    gray = np.asarray(Image.open(path).convert("L"))
    a, b = model.predict([gray, gray[:, :, None]])
    assert a.ok and a.score == pytest.approx(b.score, rel=1e-6)


def test_anomaly_map_region_and_overlay_are_over_the_image_as_given(model, synthetic_category):
    path = next((synthetic_category / "test").glob("[!g]*/*.png"))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    wide = np.concatenate([rgb, rgb], axis=1)  # another shape than the files: the map follows the input
    result = model.predict(wide)
    assert result.anomaly_map.shape == wide.shape[:2] and result.anomaly_map.dtype == np.float32
    assert result.region.shape == wide.shape[:2] and result.region.dtype == bool
    assert (result.region == (result.anomaly_map >= model.pixel_threshold)).all()
    picture = result.overlay()
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[1] >= wide.shape[1]
    from_file = model.predict(path).overlay(side_by_side=True)
    assert from_file.shape[1] >= 2 * rgb.shape[1]


def test_bad_inputs_are_results_with_errors_never_raised(model, synthetic_category, tmp_path):
    good = sorted((synthetic_category / "test").rglob("*.png"))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    inputs = [
        good,
        np.zeros((4, 4, 2), np.uint8),
        broken,
        tmp_path / "missing.png",
        np.zeros((0, 5)),
        "text",
        {"not": "an image"},
        good,
    ]
    results = model.predict(inputs)
    assert [r.ok for r in results] == [True, False, False, False, False, False, False, True]
    assert "(4, 4, 2)" in results[1].error and str(broken) in results[2].error
    assert "missing.png" in results[3].error and "dict" in results[6].error
    assert results[0].score == results[-1].score
    assert all(r.score is None and r.judgement is None for r in results[1:-1])
    with pytest.raises(DefectscopeError, match="no anomaly map"):
        results[1].overlay()


def test_maps_false_keeps_no_map_and_threshold_override(model, synthetic_category):
    path = sorted((synthetic_category / "test").rglob("*.png"))[0]
    result = model.predict(path, maps=False, threshold=1e-9)
    assert result.anomaly_map is None and result.region is None and result.judgement == 1
    assert result.threshold == 1e-9
    assert set(result.as_dict()) >= {"name", "score", "judgement", "threshold", "normalized_score", "error"}


def test_fit_save_load_round_trip(synthetic_category, tmp_path):
    model = defectscope.fit(synthetic_category, image_size=128, coreset_ratio=0.25)
    assert model.path is None and model.threshold > 0
    test = sorted((synthetic_category / "test").rglob("*.png"))[:4]
    before = [r.score for r in model.predict(test)]
    path = model.save(tmp_path / "m.dsmodel")
    assert model.path == path and model.checksum
    again = defectscope.load(path)
    assert [r.score for r in again.predict(test)] == before
    assert again.checksum == model.checksum


def test_fit_and_load_errors_are_for_people(tmp_path, synthetic_category):
    with pytest.raises(DefectscopeError, match="unknown method|method"):
        defectscope.fit(synthetic_category, method="nope")
    with pytest.raises(DefectscopeError, match="folder not found"):
        defectscope.fit(tmp_path / "nowhere")
    with pytest.raises(ModelFileError, match="model file not found"):
        defectscope.load(tmp_path / "none.dsmodel")


def test_evaluate_through_the_model(model, synthetic_category):
    result = model.evaluate(synthetic_category)
    assert result["image_auroc"] > 0.8 and result["n_failed"] == 0


# --------------------------------------------------------------------------- field reports (review of the API)
def test_thresholds_and_batch_sizes_are_checked(model, synthetic_category):
    path = sorted((synthetic_category / "test").rglob("*.png"))[0]
    for bad in (float("nan"), float("inf"), "x", None.__class__):
        with pytest.raises(DefectscopeError, match="threshold"):
            model.predict(path, threshold=bad)
    for bad in (0, 2.5, True, -3):
        with pytest.raises(DefectscopeError, match="batch_size must be a positive integer"):
            model.predict(path, batch_size=bad)
    with pytest.raises(DefectscopeError, match="threshold"):
        model.evaluate(synthetic_category, threshold=float("nan"))


def test_in_memory_images_say_what_was_not_used_as_given(model, synthetic_category):
    path = sorted((synthetic_category / "test").rglob("*.png"))[0]
    unit = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
    nan = unit.copy()
    nan[0, 0, 0] = np.nan
    stray = unit.copy()
    stray[0, 0, 0] = 1e30
    rgba = np.dstack([(unit * 255).astype(np.uint8), np.full(unit.shape[:2], 128, np.uint8)])
    clean, with_nan, with_stray, transparent = model.predict([unit, nan, stray, rgba])
    assert clean.ok and clean.notes == []
    assert with_nan.ok and any("NaN or infinite" in n for n in with_nan.notes)
    assert with_stray.ok and any("outside [0, 1]" in n and "stretched" in n for n in with_stray.notes)
    assert transparent.ok and any("transparent pixels" in n for n in transparent.notes)
    for dtype in (np.int8, np.int16, np.int32):
        result = model.predict((unit * 100).astype(dtype))
        assert not result.ok and "signed integer" in result.error and "uint8" in result.error


def test_anomaly_map_is_read_only(model, synthetic_category):
    result = model.predict(sorted((synthetic_category / "test").rglob("*.png"))[0])
    with pytest.raises(ValueError):
        result.anomaly_map[:] = 0
    assert result.anomaly_map.copy().flags.writeable


def test_fit_refuses_in_memory_images_and_says_what_it_skipped(synthetic_category, caplog):
    good = sorted((synthetic_category / "train" / "good").glob("*.png"))
    with pytest.raises(DefectscopeError, match="not ndarray"):
        defectscope.fit([np.zeros((8, 8, 3), np.uint8)] * 3, image_size=64)
    with pytest.raises(DefectscopeError, match="batch_size"):
        defectscope.fit(good[:4], image_size=64, batch_size=0)
    with caplog.at_level("WARNING", logger="defectscope.api"):
        model = defectscope.fit([*good[:4], good[0].parent / "nope.png"], image_size=64, coreset_ratio=0.5)
    assert model.meta["training"]["n_images"] == 4
    assert "nope.png" in caplog.text and "skipped training image" in caplog.text


def test_save_errors_name_the_target(model, tmp_path):
    from defectscope.common.files import OutputError

    with pytest.raises(OutputError) as info:
        model.save("/proc/nowhere/model.dsmodel")
    assert "/proc/nowhere/model.dsmodel" in str(info.value) and ".tmp" not in str(info.value)
    with pytest.raises(OutputError, match="no model file name"):
        model.save("")
