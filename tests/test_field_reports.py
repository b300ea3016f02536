"""Field reports replayed: errors a person can act on, input that must not be lost or misread,
model files that must not lie. Each test fails on the revision before the fix."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.cli.commands import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model(synthetic_category, tmp_path_factory):
    path = tmp_path_factory.mktemp("field") / "m.dsmodel"
    assert (
        main(
            [
                "fit",
                str(synthetic_category),
                "-o",
                str(path),
                "--image-size",
                "64",
                "--coreset-ratio",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    return path


@pytest.fixture()
def no_fit(monkeypatch):
    """Fail the test if the expensive part starts: the error must come before it."""
    import defectscope.fitting as fitting

    def refuse(*args, **kwargs):
        raise AssertionError("the fit started although the output could not be written")

    monkeypatch.setattr(fitting, "fit_detector", refuse)


# ------------------------------------------------------------------ output locations, checked first
def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("defectscope"), err
    assert "Traceback" not in err
    return lines[0]


def test_fit_into_a_folder_or_under_a_file_fails_before_the_fit(synthetic_category, tmp_path, capsys, no_fit):
    folder = tmp_path / "existing"
    folder.mkdir()
    code, _, err = run(capsys, "fit", synthetic_category, "-o", folder)
    assert code == 2 and "is a folder" in _one_error_line(err) and str(folder) in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(capsys, "fit", synthetic_category, "-o", afile / "m.dsmodel")
    assert code == 2 and "is a file, not a folder" in _one_error_line(err)


def test_fit_into_an_unwritable_folder_fails_before_the_fit(synthetic_category, tmp_path, capsys, no_fit, monkeypatch):
    """A read-only folder (simulated: the tests run as root, for whom permissions do not apply)."""
    import tempfile

    ro = tmp_path / "ro"
    ro.mkdir()

    def read_only(*args, dir=None, **kwargs):
        raise OSError(30, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, _, err = run(capsys, "fit", synthetic_category, "-o", ro / "m.dsmodel")
    line = _one_error_line(err)
    assert code == 2 and "read-only file system" in line and str(ro / "m.dsmodel") in line


def test_disk_full_while_saving_is_one_line_naming_the_file(synthetic_category, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import defectscope.io as io

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(io, "save_file", full)
    out = tmp_path / "m.dsmodel"
    code, _, err = run(capsys, "fit", synthetic_category, "-o", out, "--image-size", "64", "--coreset-ratio", "0.5")
    line = _one_error_line(err)
    assert code == 2 and str(out) in line and "no space left on device" in line
    assert not out.exists() and not list(tmp_path.glob(".m.dsmodel.*"))  # no half file left behind


def test_any_os_error_is_one_line_not_a_traceback(model, synthetic_category, capsys, monkeypatch):
    import defectscope.evaluation.evaluate as evaluation

    def vanished(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/data/part-0001.png")

    monkeypatch.setattr(evaluation, "evaluate_detector", vanished)
    code, _, err = run(capsys, "evaluate", model, synthetic_category)
    assert code == 2 and _one_error_line(err) == "defectscope: error: /data/part-0001.png: no such file or directory"


@pytest.mark.parametrize("option", ["--json", "--report", "--heatmaps"])
def test_evaluate_outputs_are_checked_before_scoring(model, synthetic_category, tmp_path, capsys, monkeypatch, option):
    import defectscope.evaluation.evaluate as evaluation

    monkeypatch.setattr(evaluation, "evaluate_detector", lambda *a, **k: pytest.fail("scored before the check"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    code, _, err = run(capsys, "evaluate", model, synthetic_category, option, blocker / "out")
    assert code == 2 and str(blocker) in _one_error_line(err)


# ------------------------------------------------------------------ argument values, checked while parsing
@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "M", "x.png", "--threshold", "nan"],
        ["predict", "M", "x.png", "--threshold", "inf"],
        ["fit", "D", "-o", "m", "--threshold-quantile", "1"],
        ["fit", "D", "-o", "m", "--threshold-quantile", "0"],
        ["fit", "D", "-o", "m", "--threshold-quantile", "1.5"],
        ["fit", "D", "-o", "m", "--threshold-quantile", "nan"],
        ["fit", "D", "-o", "m", "--coreset-eps", "1.2"],
        ["fit", "D", "-o", "m", "--coreset-ratio", "0"],
        ["fit", "D", "-o", "m", "--image-size", "8"],
        ["fit", "D", "-o", "m", "--batch-size", "0"],
        ["fit", "D", "-o", "m", "--folds", "1"],
        ["fit", "D", "-o", "m", "--num-neighbors", "-3"],
        ["calibrate", "M", "D", "--target-fpr", "1"],
        ["tune", "D", "--val-fraction", "0"],
        ["demo", "--n-train", "1"],
    ],
)
def test_numeric_options_are_range_checked_while_parsing(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr()[1]
    assert stop.value.code == 2
    line = _one_error_line(err)
    assert "error: argument" in line and ("range" in line or "finite" in line)


def test_detector_parameters_match_what_the_components_accept(tmp_path):
    """--coreset-eps 1.2 used to pass validation and fail after feature extraction."""
    import torch

    from defectscope.detectors.patchcore import PatchCore
    from defectscope.errors import DefectscopeError
    from defectscope.fitting import fit_detector

    with pytest.raises(DefectscopeError, match="coreset_eps"):
        PatchCore(image_size=64, coreset_eps=1.2).fit(torch.zeros(2, 3, 64, 64))
    with pytest.raises(DefectscopeError, match="quantile"):  # before any image is read
        fit_detector(PatchCore(image_size=64), [tmp_path / "a.png", tmp_path / "b.png"], threshold_quantile=1.0)


def test_json_never_holds_nan_or_infinity():
    from defectscope.common.jsonout import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), np.float32(1.5), np.float64("-inf")], "c": 2})
    assert json.loads(text) == {"a": None, "b": [None, 1.5, None], "c": 2}
    assert "NaN" not in text and "Infinity" not in text


# ------------------------------------------------------------------ folder search
def test_folder_walk_survives_symlink_loops(tmp_path, caplog):
    from defectscope.data.layouts import find_images

    root = tmp_path / "L"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a.png")
    Image.new("RGB", (8, 8)).save(root / "sub" / "b.png")
    os.symlink("../L", root / "self")
    os.symlink("..", root / "sub" / "up")
    os.symlink("/nonexistent-folder", root / "dangling")
    with caplog.at_level(logging.WARNING):
        found = find_images(root)
    assert found == [root / "a.png", root / "sub" / "b.png"]  # each real folder once
    assert "skipped 3 folder link(s)" in caplog.text


def test_predict_on_a_looping_folder_terminates(model, tmp_path, capsys, caplog):
    root = tmp_path / "L"
    root.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(root / "a.png")
    os.symlink("../L", root / "self")
    with caplog.at_level(logging.WARNING):
        code, out, _ = run(capsys, "predict", model, root)
    assert code == 0 and len(out.splitlines()) == 1 and "folder link" in caplog.text


def test_every_pillow_raster_format_is_found_and_other_files_are_named(tmp_path, caplog):
    from defectscope.data.layouts import find_images

    for ext in ("png", "webp", "gif", "ppm", "tga", "jp2", "JPG", "TIFF"):
        fmt = {"jpg": "JPEG", "tiff": "TIFF", "jp2": "JPEG2000"}.get(ext.lower(), ext.upper())
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / f"part.{ext}", format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        found = find_images(tmp_path)
    assert len(found) == 8
    assert "1 file(s) are not images and were skipped" in caplog.text and "notes.txt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert find_images(tmp_path, recursive=False) == found  # the dataset layouts' one-folder search
    assert "1 file(s) are not images" in caplog.text and "part.png" not in caplog.text


# ------------------------------------------------------------------ content only partly used
def test_extra_frames_and_transparency_are_said_once_per_file(model, tmp_path, capsys):
    frames = [Image.new("RGB", (64, 64), (v, v, v)) for v in (80, 160, 240)]
    stack = tmp_path / "stack.tif"
    frames[0].save(stack, save_all=True, append_images=frames[1:])
    opaque = np.full((64, 64, 4), 120, np.uint8)
    opaque[..., 3] = 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")  # an alpha channel, every pixel opaque
    cutout = opaque.copy()
    cutout[:, :20, 3] = 0  # a transparent background strip
    Image.fromarray(cutout, "RGBA").save(tmp_path / "cutout.png")
    code, out, err = run(capsys, "predict", model, stack, tmp_path / "cutout.png", tmp_path / "opaque.png", "--json")
    assert code == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert rows["stack.tif"]["notes"] == ["has 3 frames: only the first is used"]
    assert "composited over black" in rows["cutout.png"]["notes"][0] and "31%" in rows["cutout.png"]["notes"][0]
    assert "notes" not in rows["opaque.png"]
    assert err.count("stack.tif: has 3 frames") == 1 and err.count("cutout.png: has transparent pixels") == 1


# ------------------------------------------------------------------ model files that lie
def test_damaged_tensor_bytes_are_refused_on_load(model, tmp_path, capsys):
    from defectscope.errors import ModelFileError
    from defectscope.io import load_model, read_metadata

    damaged = tmp_path / "damaged.dsmodel"
    shutil.copy(model, damaged)
    data = bytearray(damaged.read_bytes())
    data[-4000:-1000] = bytes(3000)  # same size, part of the memory bank zeroed
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="damaged"):
        load_model(damaged)
    code, _, err = run(capsys, "predict", damaged, tmp_path)
    assert code == 2 and "damaged" in err
    assert len(read_metadata(model)["sha256"]) == 64
    t0 = time.perf_counter()
    load_model(model)
    assert time.perf_counter() - t0 < 5  # (the checksum itself: see the README's measured cost)


# ------------------------------------------------------------------ training images that set the threshold
def test_an_unusual_training_image_is_named_and_can_be_left_out(synthetic_category, tmp_path, capsys):
    from defectscope.io import read_metadata

    train = tmp_path / "good"
    shutil.copytree(synthetic_category / "train" / "good", train)
    shutil.copy(next((synthetic_category / "test" / "scratch").iterdir()), train / "zz_defective.png")
    Image.new("RGB", (1, 1), (128, 128, 128)).save(train / "zz_tiny.png")
    model = tmp_path / "m.dsmodel"
    code, _, err = run(capsys, "fit", train, "-o", model, "--image-size", "64", "--coreset-ratio", "0.25")
    assert code == 0
    suspects = {Path(s["path"]).name: s["reason"] for s in read_metadata(model)["training"]["suspects"]}
    assert "zz_tiny.png" in suspects and "far smaller" in suspects["zz_tiny.png"]
    assert "zz_defective.png" in suspects and "outlier cutoff" in suspects["zz_defective.png"]
    assert "zz_defective.png" in err and "--exclude-outliers" in err
    clean = tmp_path / "clean.dsmodel"
    code, _, err = run(
        capsys, "fit", train, "-o", clean, "--image-size", "64", "--coreset-ratio", "0.25", "--exclude-outliers"
    )
    meta = read_metadata(clean)
    excluded = {Path(s["path"]).name for s in meta["training"]["excluded"]}
    assert code == 0 and {"zz_tiny.png", "zz_defective.png"} <= excluded
    assert meta["training"]["n_images"] == 26 - len(excluded)
    assert meta["threshold"] < read_metadata(model)["threshold"]


def test_score_outlier_rule():
    from defectscope.fitting import score_outliers

    scores = np.r_[np.linspace(10, 11, 50), 25.0]
    positions, cutoff = score_outliers(scores)
    assert positions.tolist() == [50] and 11 < cutoff < 25
    assert score_outliers(np.ones(10))[0].size == 0  # no spread: nothing flagged


# ------------------------------------------------------------------ smaller things
def test_fit_reports_a_skipped_file_once_and_warnings_in_lower_case(synthetic_category, tmp_path):
    """The command as a user runs it (its own process: logging goes to stderr as configured there)."""
    import subprocess
    import sys

    train = tmp_path / "good"
    shutil.copytree(synthetic_category / "train" / "good", train)
    (train / "broken.png").write_bytes(b"not a png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectscope.cli",
            "fit",
            str(train),
            "-o",
            str(tmp_path / "m.dsmodel"),
            "--image-size",
            "64",
            "--coreset-ratio",
            "0.25",
            "-v",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr
    assert proc.returncode == 1, err
    assert err.count("broken.png") == 1
    assert "defectscope: info:" in err  # -v works, in the CLI's own lower-case style
    assert "WARNING" not in err and "INFO" not in err and "AVX512" not in err and "Traceback" not in err


def test_padim_default_channels_follow_the_architecture_not_the_full_name():
    from defectscope.detectors.padim import default_d_reduced

    assert default_d_reduced("wide_resnet50_2.tv_in1k", 1792) == 550
    assert default_d_reduced("resnet18.a1_in1k", 448) == 100
    assert default_d_reduced("hf-hub:timm/resnet18.tv_in1k", 448) == 100
    assert default_d_reduced("resnet50", 1536) == 1536


# ------------------------------------------------------------------ pictures that agree with the verdict
def test_overlay_regions_follow_the_verdict():
    from defectscope.report.heatmaps import regions

    amap = np.zeros((40, 40), np.float32)
    amap[10:14, 10:14] = 5.0
    amap[30:32, 30:32] = 3.0
    assert regions(amap, 4.0, judgement=0)[0] is None  # judged good: nothing outlined, whatever the map
    above, colour = regions(amap, 4.0, judgement=1)
    assert colour == (255, 255, 255) and above.sum() == 16
    peak, colour = regions(amap, 9.0, judgement=1)  # defective, yet no pixel reaches the pixel threshold
    assert colour == (255, 220, 0) and peak[11, 11] and not peak[31, 31]


@pytest.mark.parametrize(
    "method, extra", [("spade", []), ("padim", ["--d-reduced", "20"]), ("patchcore", ["--coreset-ratio", "0.25"])]
)
def test_every_method_stores_a_pixel_threshold_on_its_map_scale(method, extra, synthetic_category, tmp_path, capsys):
    from defectscope.io import load_model, read_metadata

    model = tmp_path / "m.dsmodel"
    code, _, _ = run(capsys, "fit", synthetic_category, "-o", model, "--method", method, "--image-size", "64", *extra)
    assert code == 0
    meta = read_metadata(model)
    info = meta["pixel_threshold_info"]
    assert meta["pixel_threshold"] == info["threshold"] > 0 and info["n_images"] >= 10
    detector, _ = load_model(model)
    import torch

    from defectscope.data.images import load_image, preprocess
    from defectscope.data.layouts import mvtec_category

    good = [s.path for s in mvtec_category(synthetic_category).test if s.label == 0]
    mean, std = detector.input_stats
    maps = detector.predict(torch.stack([preprocess(load_image(p), 64, mean, std) for p in good])).maps
    painted = float((maps >= meta["pixel_threshold"]).mean())
    assert painted < 0.05  # good images are not painted as defects (SPADE's old overlays: 91-95 %)


def test_predict_heatmaps_show_photo_overlay_and_legend_and_json_names_them(
    model, synthetic_category, tmp_path, capsys
):
    images = sorted((synthetic_category / "test" / "scratch").iterdir())[:2]
    out = tmp_path / "maps"
    code, stdout, _ = run(capsys, "predict", model, *images, "--heatmaps", out, "--json")
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    for row, image in zip(rows, images):
        picture = np.asarray(Image.open(row["heatmap"]))
        w = Image.open(image).width
        assert picture.shape[1] > 2 * w and picture.shape[0] > Image.open(image).height  # side by side + legend


# ------------------------------------------------------------------ masks
def test_masks_keep_their_defect_values_and_noisy_masks_are_binarised_at_mid_level(tmp_path, caplog):
    from defectscope.data.images import load_mask

    base = np.zeros((32, 32), np.uint8)
    base[8:16, 8:16] = 1
    for value in (1, 236, 255):  # two-valued masks: any non-zero value is a defect
        Image.fromarray(base * value).save(tmp_path / f"m{value}.png")
        assert load_mask(tmp_path / f"m{value}.png").sum() == 64
    noisy = (base * 255).astype(np.int16) + np.random.default_rng(0).integers(-20, 20, base.shape)
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)  # JPEG-like: small values everywhere
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    with caplog.at_level(logging.WARNING):
        mask = load_mask(tmp_path / "noisy.png")
    assert mask.sum() == 64 and "binarised at 128" in caplog.text and "noisy.png" in caplog.text


def test_a_mask_of_another_shape_is_an_error_naming_both_files(synthetic_category, tmp_path, model, capsys):
    category = tmp_path / "cat"
    shutil.copytree(synthetic_category, category)
    mask = sorted((category / "ground_truth" / "scratch").iterdir())[0]
    Image.open(mask).resize((128, 80)).save(mask)  # 128x80 for a 128x128 image
    code, out, err = run(capsys, "evaluate", model, category)
    image = mask.name.replace("_mask", "")
    assert code == 1 and str(mask) in err and image in err and "shape" in err
    assert "n_failed          0" in out and "n_defective       10" in out  # still judged, only not in pixel metrics


def test_missing_and_unmatched_masks_are_named(synthetic_category, tmp_path, caplog):
    from defectscope.data.layouts import mvtec_category

    category = tmp_path / "cat"
    shutil.copytree(synthetic_category, category)
    first = sorted((category / "ground_truth" / "scratch").iterdir())[0]
    first.rename(first.with_name("nothing_matches_mask.png"))
    with caplog.at_level(logging.WARNING):
        mvtec_category(category)
    assert "1 of 10 defective image(s) have no ground-truth mask" in caplog.text
    assert first.name.replace("_mask", "") in caplog.text
    assert "1 mask file(s) match no test image" in caplog.text and "nothing_matches_mask.png" in caplog.text


def test_json_lines_follow_argument_order_missing_paths_included(model, synthetic_category, tmp_path, capsys):
    good = sorted((synthetic_category / "test" / "good").iterdir())
    code, out, _ = run(capsys, "predict", model, good[0], tmp_path / "missing.png", good[1], "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [Path(r["path"]).name for r in rows] == [good[0].name, "missing.png", good[1].name]
    assert rows[1]["error"] and rows[0]["error"] is None


# ------------------------------------------------------------------ found in review
def test_outputs_never_overwrite_inputs_or_files_of_another_kind(model, synthetic_category, tmp_path, capsys, no_fit):
    image = tmp_path / "part.png"
    shutil.copy(next((synthetic_category / "train" / "good").iterdir()), image)
    before = image.read_bytes()
    code, _, err = run(capsys, "fit", synthetic_category, "-o", image)
    assert code == 2 and "not a defectscope model" in _one_error_line(err) and image.read_bytes() == before
    copy = tmp_path / "m.dsmodel"
    shutil.copy(model, copy)
    code, _, err = run(capsys, "evaluate", copy, synthetic_category, "--json", copy)
    assert code == 2 and "input of this command" in _one_error_line(err)
    code, _, err = run(capsys, "evaluate", copy, synthetic_category, "--json", image)
    assert code == 2 and "not a JSON file" in _one_error_line(err) and image.read_bytes() == before
    code, _, err = run(capsys, "calibrate", copy, synthetic_category / "test", "--f1", "-o", image)
    assert code == 2 and image.read_bytes() == before


def test_a_hand_edited_header_is_refused(model, tmp_path):
    from defectscope.errors import ModelFileError
    from defectscope.io import load_model

    data = bytearray(model.read_bytes())
    at = data.find(b'"threshold": ') + len(b'"threshold": ')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # one digit of the threshold, same size
    edited = tmp_path / "edited.dsmodel"
    edited.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="edited"):
        load_model(edited)


def test_heatmaps_of_tiny_images_do_not_stop_the_run(model, tmp_path, capsys):
    for name, size in (("a_1x1.png", (1, 1)), ("b_2x2.png", (2, 2)), ("c_1x900.png", (1, 900)), ("d_ok.png", (64, 64))):
        Image.new("RGB", size, (100, 100, 100)).save(tmp_path / name)
    code, out, err = run(capsys, "predict", model, tmp_path, "--heatmaps", tmp_path / "hm")
    assert code == 0 and len(out.splitlines()) == 4 and "Traceback" not in err
    assert len(list((tmp_path / "hm").glob("*.png"))) == 4
    code, out, err = run(capsys, "predict", model, tmp_path, "--heatmaps", tmp_path / "hm")  # again: hm/ not scored
    assert len(out.splitlines()) == 4 and "were not scored" in err


def test_a_file_named_twice_is_scored_twice(model, synthetic_category, capsys):
    image = next((synthetic_category / "test" / "good").iterdir())
    code, out, _ = run(capsys, "predict", model, image, image)
    assert code == 0 and len(out.splitlines()) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "D", "-o", "m", "--seed", "99999999999999999999999"],
        ["predict", "M", "x", "--threads", "99999999999999999999999"],
        ["fit", "D", "-o", "m", "--batch-size", "100000"],
    ],
)
def test_huge_integers_are_refused_while_parsing(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and "out of range" in capsys.readouterr()[1]


def test_a_bank_cap_below_the_folds_is_refused_before_the_work():
    import torch

    from defectscope.detectors.patchcore import PatchCore
    from defectscope.errors import DefectscopeError

    with pytest.raises(DefectscopeError, match="max_bank_size=1 is below folds=5"):
        PatchCore(image_size=64, max_bank_size=1).fit(torch.rand(3, 3, 64, 64))
    tiny = PatchCore(image_size=64, coreset_ratio=1e-9).fit(torch.rand(6, 3, 64, 64))  # one entry per fold
    assert tiny.memory_bank_.shape[0] == 5 and tiny.training_scores().shape == (6,)


def test_dataset_roots_and_mask_folders_are_not_good_images(synthetic_category, tmp_path, capsys, no_fit):
    root = tmp_path / "root"
    shutil.copytree(synthetic_category, root / "synthetic")
    code, _, err = run(capsys, "fit", root, "-o", tmp_path / "m.dsmodel")
    assert code == 2 and "holds dataset categories" in err
    code, _, err = run(capsys, "fit", root / "synthetic" / "ground_truth", "-o", tmp_path / "m.dsmodel")
    assert code == 2 and "masks" in err
