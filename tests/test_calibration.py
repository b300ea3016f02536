"""Threshold calibration: the rules against brute force, and `defectscope calibrate` on a real model file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectscope.errors import DataLayoutError, DefectscopeError
from defectscope.evaluation.calibration import (
    calibrate_threshold,
    calibration_samples,
    false_reject_upper_bound,
    threshold_for_fpr,
)

# ----------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize("n", [5, 37, 200, 1000])
@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
def test_fpr_threshold_is_lowest_reaching_the_target(n, target):
    rng = np.random.default_rng(n)
    good = rng.normal(size=n)
    t = threshold_for_fpr(good, target)
    rejected = int((good >= t).sum())
    assert rejected <= np.floor(target * n + 1e-9)
    # brute force: no lower candidate threshold (a good score) keeps the rate within target
    lower = np.sort(good)[np.sort(good) < t]
    if lower.size:
        assert (good >= lower.max()).sum() > np.floor(target * n + 1e-9)


def test_fpr_threshold_with_ties_never_rejects_more_than_allowed():
    good = np.array([1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0, 5.0])
    t = threshold_for_fpr(good, 0.2)  # 2 may be rejected, but the top three are tied
    assert (good >= t).sum() == 0 and t > 5.0
    t = threshold_for_fpr(good, 0.3)
    assert (good >= t).sum() == 3 and 4.0 < t < 5.0


def test_good_only_rule_reports_count_and_warns_when_too_few():
    good = np.linspace(0.0, 1.0, 20)
    info = calibrate_threshold(np.zeros(20), good, target_fpr=0.01)
    assert info["n_good"] == 20 and info["n_defective"] == 0 and info["n_images"] == 20
    assert info["threshold"] > 1.0 and info["false_reject_rate"] == 0.0
    assert "warning" in info and "20 good images" in info["warning"] and "100" in info["warning"]
    # with 0 of 20 rejected the true rate can still be ~14 % (rule of three: 3/n)
    assert info["false_reject_upper95"] == pytest.approx(1 - 0.05 ** (1 / 20))
    assert "miss_rate" not in info


def test_good_only_rule_with_enough_images_has_no_warning():
    rng = np.random.default_rng(1)
    good = rng.normal(size=400)
    info = calibrate_threshold(np.zeros(400), good, target_fpr=0.05)
    assert "warning" not in info
    assert info["false_reject_rate"] == pytest.approx(20 / 400)
    assert info["false_reject_rate"] < info["false_reject_upper95"] < 0.08


def test_f1_rule_matches_brute_force_and_reports_miss_rate():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(30), np.ones(30)].astype(int)
    scores = np.r_[rng.normal(0, 1, 30), rng.normal(2, 1, 30)]
    info = calibrate_threshold(labels, scores, f1=True)
    best = max(2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + 30) for t in scores)
    assert info["f1"] == pytest.approx(best)
    c = info["confusion"]
    assert 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) == pytest.approx(best)
    assert info["miss_rate"] == pytest.approx(c["fn"] / 30)
    assert "warning" not in info


def test_f1_rule_on_few_images_warns_and_needs_defects():
    info = calibrate_threshold(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.8, 0.9]), f1=True)
    assert info["threshold"] == pytest.approx(0.8) and "warning" in info and "3 good and 2 defective" in info["warning"]
    with pytest.raises(DataLayoutError, match="--target-fpr"):
        calibrate_threshold(np.zeros(5), np.arange(5.0), f1=True)
    with pytest.raises(DefectscopeError, match="not both"):
        calibrate_threshold(np.array([0, 1]), np.array([0.0, 1.0]), f1=True, target_fpr=0.1)
    with pytest.raises(DefectscopeError, match="NaN"):
        calibrate_threshold(np.array([0, 1]), np.array([0.0, np.nan]))


def test_upper_bound_edges():
    assert false_reject_upper_bound(0, 0) == 1.0 and false_reject_upper_bound(5, 5) == 1.0
    assert false_reject_upper_bound(0, 300) == pytest.approx(3 / 300, rel=0.01)  # rule of three


def test_calibration_samples_layouts(synthetic_category, tmp_path):
    with pytest.raises(DataLayoutError, match="--split test"):  # the split evaluate reports on: only if asked
        calibration_samples(synthetic_category)
    paths, labels, source = calibration_samples(synthetic_category, split="test")
    assert len(paths) == 20 and labels.sum() == 10 and "test split" in source
    paths, labels, source = calibration_samples(synthetic_category / "test")  # a plain labelled folder
    assert len(paths) == 20 and labels.sum() == 10 and "labelled folder" in source
    paths, labels, source = calibration_samples(synthetic_category / "train" / "good")
    assert len(paths) == 24 and labels.sum() == 0 and "24 good images" in source
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match="no images"):
        calibration_samples(tmp_path / "empty")


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def fitted(synthetic_category, tmp_path_factory):
    from defectscope.cli.commands import main

    path = tmp_path_factory.mktemp("calib") / "m.dsmodel"
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
def model(fitted, tmp_path):
    """A fresh copy of the fitted model for each test (calibrate rewrites it)."""
    return Path(shutil.copy(fitted, tmp_path / "m.dsmodel"))


def test_calibrate_command_good_only_then_f1(model, synthetic_category, tmp_path, capsys):
    from defectscope.cli.commands import main
    from defectscope.io import read_metadata

    capsys.readouterr()
    before = read_metadata(model)
    good = tmp_path / "val"
    shutil.copytree(synthetic_category / "test" / "good", good)
    assert main(["calibrate", str(model), str(good), "--target-fpr", "0.05", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    meta = read_metadata(model)
    info = meta["threshold_info"]
    assert meta["threshold"] == info["threshold"] != before["threshold"]
    assert info["n_good"] == 10 and info["target_fpr"] == 0.05
    assert "10 good" in out and "warning" in err and "10 good images" in err  # never silent
    assert meta["threshold_history"][-1]["threshold"] == before["threshold"]
    assert meta["threshold_history"][-1]["threshold_info"] == before["threshold_info"]

    # the new threshold is what predict uses: all 10 good validation images pass (target 5 % of 10 -> 0)
    assert main(["predict", str(model), str(good), "--json", "--no-progress"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert all(r["judgement"] == 0 and r["threshold"] == meta["threshold"] for r in rows)

    assert main(["calibrate", str(model), str(synthetic_category), "--f1", "--no-progress"]) == 2
    assert "--split test" in capsys.readouterr()[1]
    assert main(["calibrate", str(model), str(synthetic_category), "--f1", "--split", "test", "--no-progress"]) == 0
    assert f"test split of {synthetic_category}" in capsys.readouterr()[0]  # says which images it used
    meta2 = read_metadata(model)
    assert meta2["threshold_info"]["rule"].startswith("best image F1")
    assert [h["threshold"] for h in meta2["threshold_history"]] == [before["threshold"], meta["threshold"]]
    assert meta2["threshold_info"]["n_defective"] == 10


def test_predict_normalized_scores(model, synthetic_category, capsys):
    from defectscope.cli.commands import main
    from defectscope.io import read_metadata

    threshold = read_metadata(model)["threshold"]
    folder = synthetic_category / "test" / "scratch"
    capsys.readouterr()
    assert main(["predict", str(model), str(folder), "--json", "--normalized", "--no-progress"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert len(rows) == 5
    for r in rows:
        assert r["score"] == pytest.approx(r["raw_score"] / threshold)
        assert r["judgement"] == int(r["score"] >= 1.0)
    assert main(["predict", str(model), str(folder), "--normalized", "--no-progress"]) == 0
    csv_scores = [float(line.split(",")[1]) for line in capsys.readouterr()[0].splitlines()]
    assert csv_scores == pytest.approx([r["score"] for r in rows], abs=1e-6)
    assert main(["predict", str(model), str(folder), "--normalized", "--threshold", "0", "--no-progress"]) == 2
    assert "positive threshold" in capsys.readouterr()[1]


def test_calibrate_to_a_new_file_leaves_the_model_alone(model, synthetic_category, tmp_path, capsys):
    from defectscope.cli.commands import main
    from defectscope.io import load_model, read_metadata

    before = model.read_bytes()
    new = tmp_path / "out" / "calibrated.dsmodel"
    assert (
        main(["calibrate", str(model), str(synthetic_category / "test"), "--f1", "-o", str(new), "--no-progress"]) == 0
    )
    assert model.read_bytes() == before
    meta = read_metadata(new)
    assert meta["threshold_info"]["rule"].startswith("best image F1")
    assert meta["threshold_history"][-1]["threshold"] == read_metadata(model)["threshold"]
    load_model(new)  # loads, checksum and all


def test_calibrate_that_cannot_write_says_the_threshold(model, synthetic_category, monkeypatch, capsys):
    """Writing fails after scoring (e.g. the disk fills up): the computed threshold is printed, not lost."""
    import defectscope.io as io
    from defectscope.cli.commands import main

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(model))

    monkeypatch.setattr(io, "update_metadata", full_disk)
    capsys.readouterr()
    code = main(["calibrate", str(model), str(synthetic_category / "test"), "--f1", "--no-progress"])
    err = capsys.readouterr()[1]
    assert code == 2 and "Traceback" not in err
    assert "no space left on device" in err and "NOT saved" in err and "--threshold " in err
