"""The command line end to end: fit, predict, evaluate, and what happens with bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from defectscope.cli.commands import main
from defectscope.io import read_metadata


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model(synthetic_category, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "synthetic.dsmodel"
    code = main(
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
    assert code == 0
    return path


def test_fit_writes_model_with_threshold(model):
    meta = read_metadata(model)
    assert meta["method"] == "patchcore"
    assert meta["image_size"] == 128
    assert meta["training"]["n_images"] == 24
    info = meta["threshold_info"]
    assert info["n_images"] == 24 and info["quantile"] == 0.99
    assert meta["threshold"] < info["score_max"] + 1e-9
    assert "warning" in info  # 24 images are too few for a 99 % quantile, and the model says so


def test_predict_prints_path_score_judgement(model, synthetic_category, capsys):
    code, out, _ = run(capsys, "predict", model, synthetic_category / "test")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert len(rows) == 20
    for path, score, judgement in rows:
        assert Path(path).exists()
        float(score)
        assert judgement in {"0", "1"}
    defect_judged = [int(j) for p, _, j in rows if "/good/" not in p]
    good_judged = [int(j) for p, _, j in rows if "/good/" in p]
    assert sum(defect_judged) >= 8 and sum(good_judged) <= 2


def test_threshold_override_and_json(model, synthetic_category, capsys):
    code, out, _ = run(capsys, "predict", model, synthetic_category / "test" / "good", "--json", "--threshold", "0")
    assert code == 0
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == 10
    assert all(o["judgement"] == 1 and o["threshold"] == 0 and o["error"] is None for o in objs)
    assert {"path", "score", "judgement", "threshold", "error"} <= set(objs[0])


def test_bad_images_do_not_stop_the_batch(model, synthetic_category, tmp_path, capsys):
    good = sorted((synthetic_category / "test" / "good").iterdir())[:3]
    for p in good:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    truncated = good[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 3])
    code, out, err = run(capsys, "predict", model, tmp_path, tmp_path / "missing.png", "--json")
    assert code == 1
    objs = [json.loads(line) for line in out.splitlines()]
    scored = [o for o in objs if o["error"] is None]
    failed = {Path(o["path"]).name: o["error"] for o in objs if o["error"] is not None}
    assert len(scored) == 3
    assert set(failed) == {"empty.png", "notes.png", "truncated.png", "missing.png"}
    for name in failed:
        assert name in err
    assert all(len(line) < 300 for line in err.splitlines())


def test_predict_writes_heatmaps(model, synthetic_category, tmp_path, capsys):
    code, _, _ = run(capsys, "predict", model, synthetic_category / "test" / "scratch", "--heatmaps", tmp_path / "h")
    assert code == 0
    pngs = list((tmp_path / "h").glob("*.png"))
    assert len(pngs) == 5
    from defectscope.data.images import load_image

    h, w, _ = load_image(pngs[0]).shape
    assert w > 2 * 128 and h > 128  # the photo beside its overlay, a legend strip below


def test_evaluate_prints_and_writes_json(model, synthetic_category, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    code, out, _ = run(capsys, "evaluate", model, synthetic_category, "--json", out_json)
    assert code == 0
    assert "image_auroc" in out and "pixel_auroc" in out
    result = json.loads(out_json.read_text())
    for key in ("image_auroc", "pixel_auroc", "n_good", "n_defective", "images_per_second"):
        assert key in result
    assert result["n_good"] == 10 and result["n_defective"] == 10
    assert result["image_auroc"] >= 0.95
    assert result["pixel_auroc"] >= 0.9


def test_unreadable_model_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "model.dsmodel"
    bad.write_text("garbage")
    code, out, err = run(capsys, "predict", bad, tmp_path)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "model.dsmodel" in err


def test_fit_on_empty_folder_fails_before_work(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "fit", tmp_path / "empty", "-o", tmp_path / "m.dsmodel")
    assert code == 2
    assert "empty" in err and "0" in err
    assert not (tmp_path / "m.dsmodel").exists()


def test_fit_with_too_few_images(synthetic_category, tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(next((synthetic_category / "train" / "good").iterdir()), folder / "a.png")
    code, _, err = run(capsys, "fit", folder, "-o", tmp_path / "m.dsmodel")
    assert code == 2
    assert "at least 2" in err


def test_unknown_layer_lists_valid_names(synthetic_category, tmp_path, capsys):
    code, _, err = run(capsys, "fit", synthetic_category, "-o", tmp_path / "m.dsmodel", "--layers", "blocks.99")
    assert code == 2
    assert "blocks.99" in err and "blocks.2" in err


def test_parameter_of_another_method_is_rejected(synthetic_category, tmp_path, capsys):
    code, _, err = run(capsys, "fit", synthetic_category, "-o", tmp_path / "m.dsmodel", "--k", "5")
    assert code == 2
    assert "patchcore does not take" in err


def test_console_script_help_and_exit_code():
    exe = Path(sys.executable).with_name("defectscope")
    out = subprocess.run([str(exe), "predict", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--threshold" in out.stdout and "--heatmaps" in out.stdout and "--json" in out.stdout


def test_odd_formats_are_all_scored(model, tmp_path, capsys):
    from synthetic import write_odd_images

    written = write_odd_images(tmp_path / "odd")
    code, out, err = run(capsys, "predict", model, tmp_path / "odd", "--json")
    assert code == 0, err
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == len(written)
    assert all(o["error"] is None and o["score"] is not None for o in objs)


def test_fit_records_coreset_details(model):
    details = read_metadata(model)["training"]["details"]
    assert details["n_selected"] == -(-details["n_patches"] // 4)  # ceil(0.25 * patches)
    assert details["coverage_radius"] > 0 and details["coreset_s"] >= 0


def test_normalization_option_is_stored_in_the_model(synthetic_category, tmp_path, capsys):
    path = tmp_path / "weights-stats.dsmodel"
    code, _, err = run(
        capsys,
        "fit",
        synthetic_category,
        "-o",
        path,
        "--image-size",
        "64",
        "--coreset-ratio",
        "0.5",
        "--normalization",
        "weights",
    )
    assert code == 0, err
    meta = read_metadata(path)
    assert meta["params"]["normalization"] == "weights"
    assert meta["normalization"]["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(SystemExit) as exc:
        run(capsys, "fit", synthetic_category, "-o", tmp_path / "x.dsmodel", "--normalization", "zscore")
    assert exc.value.code == 2 and "'zscore'" in capsys.readouterr().err


def test_rotations_option_is_checked_and_stored(synthetic_category, tmp_path, capsys):
    path = tmp_path / "rot.dsmodel"
    code, _, err = run(
        capsys,
        "fit",
        synthetic_category,
        "-o",
        path,
        "--image-size",
        "64",
        "--coreset-ratio",
        "0.5",
        "--rotations",
        "2",
    )
    assert code == 0, err
    meta = read_metadata(path)
    assert meta["params"]["rotations"] == 2 and meta["training"]["details"]["rotations"] == 2
    with pytest.raises(SystemExit) as exc:
        run(capsys, "fit", synthetic_category, "-o", tmp_path / "x.dsmodel", "--rotations", "0")
    assert exc.value.code == 2 and "out of range" in capsys.readouterr().err


def test_patchcore_defaults_to_288_px_and_equal_layer_weighting(synthetic_category, tmp_path, capsys):
    path = tmp_path / "default.dsmodel"
    code, _, err = run(capsys, "fit", synthetic_category, "-o", path, "--coreset-ratio", "0.5")
    assert code == 0, err
    meta = read_metadata(path)
    assert meta["image_size"] == 288 and meta["params"]["layer_weighting"] == "equal"
    channels = tmp_path / "channels.dsmodel"
    code, _, err = run(
        capsys,
        "fit",
        synthetic_category,
        "-o",
        channels,
        "--image-size",
        "64",
        "--coreset-ratio",
        "0.5",
        "--layer-weighting",
        "channels",
    )
    assert code == 0, err
    assert read_metadata(channels)["params"]["layer_weighting"] == "channels"
    padim = tmp_path / "padim.dsmodel"
    code, _, err = run(capsys, "fit", synthetic_category, "-o", padim, "--method", "padim")
    assert code == 0, err
    assert read_metadata(padim)["image_size"] == 256
    with pytest.raises(SystemExit) as exc:
        run(capsys, "fit", synthetic_category, "-o", tmp_path / "x.dsmodel", "--layer-weighting", "width")
    assert exc.value.code == 2 and "'width'" in capsys.readouterr().err
