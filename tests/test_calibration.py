"""Threshold calibration: the rules against brute force, and `defectscope calibrate` on a real model file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectscope.errors import DataLayoutError, DefectscopeError
from defectscope.evaluation.calibration import (
    calibrate_threshold,
    calibration_samples,
    false_reject_upper_bound,
    make_rule,
    threshold_at_catch,
    threshold_of_least_cost,
)
from defectscope.evaluation.operating import clopper_pearson

# ----------------------------------------------------------------------------- pure rules, against brute force


def _scores(rng: np.random.Generator, n_good: int, n_bad: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels and overlapping scores; with ``ties``, rounded so that many scores are equal (within and across classes)."""
    scores = np.r_[rng.normal(0.0, 1.0, n_good), rng.normal(1.5, 1.0, n_bad)]
    if ties:
        scores = np.round(scores, 1)
    return np.r_[np.zeros(n_good, int), np.ones(n_bad, int)], scores


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Every threshold worth trying: each score, the floats just above and below it, and beyond both ends."""
    s = np.unique(scores)
    return np.unique(np.r_[s, np.nextafter(s, np.inf), np.nextafter(s, -np.inf), s.min() - 1, s.max() + 1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_catch_threshold_is_the_highest_that_catches_the_target(seed, target):
    rng = np.random.default_rng(seed)
    labels, scores = _scores(rng, 30, [5, 19, 20, 37, 141, 200][seed], ties=seed % 2 == 0)
    bad = scores[labels == 1]
    t = calibrate_threshold(labels, scores, catch=target)["threshold"]
    assert t == threshold_at_catch(bad, target)
    need = int(np.ceil(target * bad.size - 1e-9))
    brute = max(c for c in _candidates(scores) if (bad >= c).sum() >= need)
    assert t == brute
    assert (bad >= t).sum() >= need


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
def test_false_reject_threshold_is_the_lowest_within_the_target(seed, target):
    rng = np.random.default_rng(10 + seed)
    labels, scores = _scores(rng, [5, 37, 99, 100, 200, 1000][seed], 10, ties=seed % 2 == 1)
    good = scores[labels == 0]
    allowed = int(np.floor(target * good.size + 1e-9))
    info = calibrate_threshold(labels, scores, false_reject=target)
    t = info["threshold"]
    brute = min(c for c in _candidates(scores) if (good >= c).sum() <= allowed)
    assert t == brute
    assert (good >= np.nextafter(t, -np.inf)).sum() > allowed  # the float just below rejects too many
    # the older name of the rule gives the same threshold
    assert calibrate_threshold(labels, scores, target_fpr=target)["threshold"] == t


def _brute_cost(labels, scores, cost_miss, cost_reject):
    good, bad = scores[labels == 0], scores[labels == 1]
    rows = []
    for c in np.r_[np.unique(scores), scores.max() + 1]:
        cost = cost_miss * int((bad < c).sum()) + cost_reject * int((good >= c).sum())
        rows.append((cost, c))
    best = min(cost for cost, _ in rows)
    tied = [c for cost, c in rows if cost <= best + 1e-9 * max(1.0, best)]
    return best, min(tied)  # ties: the lowest threshold, which catches the most


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("costs", [(1.0, 1.0), (2.0, 1.0), (20.0, 1.0), (0.3, 1.0), (7.5, 2.5), (1.0, 0.1)])
def test_cost_threshold_is_the_least_cost_and_ties_go_lower(seed, costs):
    rng = np.random.default_rng(20 + seed)
    labels, scores = _scores(rng, [12, 26, 50, 8][seed % 4], [9, 141, 30, 40][seed % 4], ties=seed >= 4)
    cost_miss, cost_reject = costs
    info = calibrate_threshold(labels, scores, cost_miss=cost_miss, cost_reject=cost_reject)
    best, brute = _brute_cost(labels, scores, cost_miss, cost_reject)
    assert info["expected_cost"] == pytest.approx(best)
    t = info["threshold"]
    if brute > scores.max():  # "reject none": any threshold above the highest score
        assert t > scores.max()
    else:
        assert t == brute
    assert t == threshold_of_least_cost(labels, scores, cost_miss, cost_reject)


def test_cost_tie_is_broken_towards_catching_more():
    # missing the defect (cost 2) and rejecting both good parts above it (2 x 1) cost the same: catch it
    labels = np.array([0, 0, 0, 1])
    scores = np.array([0.1, 0.8, 0.9, 0.5])
    assert threshold_of_least_cost(labels, scores, 2.0, 1.0) == 0.5
    # one more good part above it makes missing it cheaper
    labels, scores = np.r_[labels, 0], np.r_[scores, 0.95]
    assert threshold_of_least_cost(labels, scores, 2.0, 1.0) > 0.95


def test_rates_carry_clopper_pearson_intervals():
    rng = np.random.default_rng(3)
    labels, scores = _scores(rng, 40, 60, ties=False)
    info = calibrate_threshold(labels, scores, catch=0.9)
    catch, rejects = info["rates"]["catch"], info["rates"]["false_reject"]
    assert catch["n"] == 60 and catch["count"] == int((scores[labels == 1] >= info["threshold"]).sum()) >= 54
    assert catch["ci"] == list(clopper_pearson(catch["count"], 60))
    assert rejects["n"] == 40 and rejects["ci"] == list(clopper_pearson(rejects["count"], 40))
    assert info["rule_short"] == "catch >= 0.9" and info["target_catch"] == 0.9
    assert info["miss_rate"] == pytest.approx(1 - catch["rate"])


def test_catch_warns_when_the_target_cannot_be_told_from_100_percent():
    for n_bad, warned in ((19, True), (20, False)):
        labels = np.r_[np.zeros(30, int), np.ones(n_bad, int)]
        scores = np.r_[np.linspace(0, 1, 30), np.linspace(0.5, 2, n_bad)]
        info = calibrate_threshold(labels, scores, catch=0.95)
        assert ("warning" in info) == warned
        if warned:  # the rule, the count, the number needed (and the number to show it at 95 % confidence)
            assert "19 defective" in info["warning"] and "100 %" in info["warning"] and "at least 20" in info["warning"]
            assert "72" in info["warning"]
            assert info["rates"]["catch"]["count"] == 19  # catching 95 % of 19 means catching all of them
    info = calibrate_threshold(np.r_[np.zeros(3, int), np.ones(3, int)], np.arange(6.0), catch=1.0)
    assert "warning" not in info and info["threshold"] == 3.0


def test_false_reject_and_cost_warn_on_few_images():
    rng = np.random.default_rng(4)
    for n_good, warned in ((99, True), (100, False)):
        labels, scores = _scores(rng, n_good, 5, ties=False)
        info = calibrate_threshold(labels, scores, false_reject=0.01)
        assert ("warning" in info) == warned
        if warned:
            assert f"only {n_good} good images" in info["warning"] and "at least 100" in info["warning"]
    labels, scores = _scores(rng, 9, 30, ties=False)
    info = calibrate_threshold(labels, scores, cost_miss=10)
    assert "9 good and 30 defective" in info["warning"] and "at least 10 of each" in info["warning"]
    labels, scores = _scores(rng, 10, 10, ties=False)
    assert "warning" not in calibrate_threshold(labels, scores, cost_miss=10)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"catch": 0.0}, "--catch 0.0 is out of range"),
        ({"catch": 1.5}, "--catch 1.5 is out of range"),
        ({"catch": float("nan")}, "--catch nan is out of range"),
        ({"false_reject": 1.0}, "--false-reject 1.0 is out of range"),
        ({"cost_miss": -1.0}, "--cost-miss -1.0: costs must be positive"),
        ({"cost_miss": 5.0, "cost_reject": 0.0}, "--cost-reject 0.0: costs must be positive"),
        ({"cost_reject": 2.0}, "give --cost-miss too"),
        ({"catch": 0.9, "cost_miss": 2.0}, "choose one calibration rule, not --catch and --cost-miss"),
        ({"false_reject": 0.1, "target_fpr": 0.2}, "another name for --false-reject"),
    ],
)
def test_rules_refuse_values_they_cannot_use(options, words):
    with pytest.raises(DefectscopeError, match=re.escape(words)):
        make_rule(**options)


def test_rules_refuse_images_without_the_labels_they_need():
    make_rule(false_reject=0.01).check_labels(10, 0, "DATA")  # good images suffice
    make_rule(catch=0.9).check_labels(0, 10, "DATA")  # defective images suffice
    for options in ({"catch": 0.95}, {"cost_miss": 20.0}, {"f1": True}):
        with pytest.raises(DataLayoutError, match="needs labelled defective images, and DATA has none"):
            make_rule(**options).check_labels(10, 0, "DATA")
    for options in ({"false_reject": 0.01}, {"cost_miss": 20.0}, {"f1": True}):
        with pytest.raises(DataLayoutError, match="needs good images, and DATA has none"):
            make_rule(**options).check_labels(0, 10, "DATA")


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
    with pytest.raises(DataLayoutError, match="--false-reject"):
        calibrate_threshold(np.zeros(5), np.arange(5.0), f1=True)
    with pytest.raises(DefectscopeError, match="choose one calibration rule"):
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


# ----------------------------------------------------------------------------- refusals before scoring


@pytest.fixture()
def no_scoring(monkeypatch):
    """A stand-in for scoring that fails the test if it is called: a refusal must come first."""
    import defectscope.scoring as scoring

    def refuse(*args, **kwargs):
        raise AssertionError("images were scored before the refusal")

    monkeypatch.setattr(scoring, "score_paths", refuse)


@pytest.mark.parametrize(
    "rule, words",
    [
        (["--catch", "0.95"], "--catch 0.95 needs labelled defective images"),
        (["--cost-miss", "20"], "--cost-miss 20 needs labelled defective images"),
        (["--f1"], "--f1 needs labelled defective images"),
    ],
)
def test_rules_without_their_labels_are_refused_before_scoring(
    model, synthetic_category, capsys, no_scoring, rule, words
):
    from defectscope.cli.commands import main

    good_only = synthetic_category / "train" / "good"  # a folder without good/: good images only
    before = model.read_bytes()
    capsys.readouterr()
    assert main(["calibrate", str(model), str(good_only), *rule, "--no-progress"]) == 2
    err = capsys.readouterr()[1]
    assert words in err and str(good_only) in err and "labelled folder" in err and "Traceback" not in err
    assert model.read_bytes() == before


@pytest.mark.parametrize(
    "options, words",
    [
        (["--catch", "0.9", "--name", "two words"], "threshold name 'two words' is not allowed"),
        (["--catch", "0.9", "--name", "fit"], "--name fit is the fit-time threshold's name"),
        (["--cost-reject", "2"], "give --cost-miss too"),
    ],
)
def test_bad_names_and_options_are_refused_before_scoring(
    model, synthetic_category, capsys, no_scoring, options, words
):
    from defectscope.cli.commands import main

    capsys.readouterr()
    assert main(["calibrate", str(model), str(synthetic_category / "test"), *options, "--no-progress"]) == 2
    assert words in capsys.readouterr()[1]


@pytest.mark.parametrize(
    "option, value, allowed",
    [("--catch", "1.5", "in (0, 1]"), ("--catch", "0", "in (0, 1]"), ("--cost-miss", "-3", "> 0")],
)
def test_values_out_of_range_are_refused_while_parsing(
    model, synthetic_category, capsys, no_scoring, option, value, allowed
):
    from defectscope.cli.commands import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["calibrate", str(model), str(synthetic_category / "test"), option, value])
    assert stop.value.code == 2
    err = capsys.readouterr()[1]
    assert f"argument {option}: {value} is out of range: give a value {allowed}" in err


# ----------------------------------------------------------------------------- named thresholds


def _json_rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr()[0].splitlines()]


def test_named_thresholds_round_trip_and_judge_by_name(model, synthetic_category, capsys):
    import defectscope
    from defectscope.cli.commands import main
    from defectscope.io import read_model_file

    test = synthetic_category / "test"
    fit_value = read_model_file(model)[1]["threshold"]
    capsys.readouterr()
    assert main(["calibrate", str(model), str(test), "--catch", "0.9", "--no-progress"]) == 0
    out = capsys.readouterr()[0]
    assert 'threshold "catch-0.9" = ' in out and f'now the active threshold (was "fit" = {fit_value:.6g})' in out
    assert "catch rate:        " in out and "false-reject rate: " in out and "(95 % CI " in out
    assert "10 good and 10 defective" in out
    assert main(["calibrate", str(model), str(test), "--false-reject", "0.1", "--name", "strict", "--no-activate"]) == 0
    out = capsys.readouterr()[0]
    assert 'threshold "strict"' in out and 'a named alternative (the active threshold stays "catch-0.9"' in out

    _, meta = read_model_file(model)  # the checksum is verified: the file was rewritten whole
    named = meta["thresholds"]
    assert set(named) == {"fit", "catch-0.9", "strict"}
    assert meta["active_threshold"] == "catch-0.9" and meta["threshold"] == named["catch-0.9"]["value"]
    assert named["fit"]["value"] == fit_value and named["fit"]["rule"].startswith("quantile 0.99")
    strict = named["strict"]
    assert strict["rule"] == "false-reject <= 0.1" and strict["target_fpr"] == 0.1
    assert strict["counts"] == {"n_good": 10, "n_defective": 10, "n_failed": 0}
    rejects, catch = strict["rates"]["false_reject"], strict["rates"]["catch"]
    assert rejects["n"] == 10 and rejects["count"] <= 1 and rejects["ci"] == list(clopper_pearson(rejects["count"], 10))
    assert catch["n"] == 10 and catch["ci"] == list(clopper_pearson(catch["count"], 10))
    assert strict["data"] == str(test) and strict["date"].startswith("20")
    assert strict["previous"] == {"name": "catch-0.9", "value": meta["threshold"]}
    assert named["catch-0.9"]["previous"] == {"name": "fit", "value": fit_value}
    assert [h["threshold"] for h in meta["threshold_history"]] == [fit_value]  # only activation moves the history

    m = defectscope.load(model)
    values = {name: entry["value"] for name, entry in named.items()}
    assert m.thresholds == values and m.threshold_name == "catch-0.9" and m.threshold == values["catch-0.9"]
    assert list(m.thresholds) == ["fit", "catch-0.9", "strict"]  # fit first, then oldest first
    assert m.info()["thresholds"] == values and m.info()["threshold_name"] == "catch-0.9"
    assert len(set(values.values())) == 3

    paths = sorted(test.rglob("*.png"))
    scores = np.array([r.score for r in m.predict(paths, maps=False)])
    judged = {}
    for name, value in values.items():
        want = (scores >= value).astype(int).tolist()
        results = m.predict(paths, maps=False, threshold_name=name)
        assert [r.judgement for r in results] == want and {r.threshold for r in results} == {value}
        assert main(["predict", str(model), *map(str, paths), "--json", "--threshold-name", name, "--no-progress"]) in (
            0,
            1,
        )
        rows = _json_rows(capsys)
        assert [r["judgement"] for r in rows] == want and {r["threshold"] for r in rows} == {value}
        judged[name] = tuple(want)
    assert len(set(judged.values())) > 1  # the names judge differently, so the test can tell them apart
    # the active threshold is the default
    assert [r.judgement for r in m.predict(paths, maps=False)] == list(judged["catch-0.9"])

    assert main(["predict", str(model), str(paths[0]), "--threshold-name", "lenient"]) == 2
    err = capsys.readouterr()[1]
    assert "no threshold named 'lenient'" in err and "fit (" in err and "catch-0.9 (" in err and ", active)" in err
    with pytest.raises(DefectscopeError, match=r"no threshold named 'lenient'.*strict \("):
        m.predict(paths[0], threshold_name="lenient")
    with pytest.raises(DefectscopeError, match="not both"):
        m.predict(paths[0], threshold=1.0, threshold_name="strict")
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["predict", str(model), str(paths[0]), "--threshold", "1", "--threshold-name", "strict"])


def test_recalibrating_a_name_replaces_it_and_the_active_name_stays_active(model, synthetic_category, capsys):
    from defectscope.cli.commands import main
    from defectscope.io import read_metadata

    test = synthetic_category / "test"
    assert main(["calibrate", str(model), str(test), "--catch", "1", "--name", "strict", "--no-progress"]) == 0
    first = read_metadata(model)["thresholds"]["strict"]["value"]
    capsys.readouterr()
    # the active name, recalibrated with --no-activate, still updates the active threshold: it is that name
    assert main(["calibrate", str(model), str(test), "--catch", "0.5", "--name", "strict", "--no-activate"]) == 0
    out = capsys.readouterr()[0]
    assert f'replaces the earlier "strict" = {first:.6g}' in out
    meta = read_metadata(model)
    assert meta["thresholds"]["strict"]["value"] == meta["threshold"] > first  # half the defects: a higher threshold
    assert meta["thresholds"]["strict"]["previous"] == {"name": "strict", "value": first}


def test_cost_rule_from_the_command_line(model, synthetic_category, capsys):
    from defectscope.cli.commands import main
    from defectscope.io import read_metadata

    capsys.readouterr()
    code = main(["calibrate", str(model), str(synthetic_category / "test"), "--cost-miss", "20", "--no-progress"])
    assert code == 0
    out = capsys.readouterr()[0]
    entry = read_metadata(model)["thresholds"]["cost-20"]
    assert entry["cost_miss"] == 20 and entry["cost_reject"] == 1 and entry["rule"].startswith("least cost")
    misses = 10 - entry["rates"]["catch"]["count"]
    cost = 20 * misses + entry["rates"]["false_reject"]["count"]
    assert f"expected cost:     {cost:g} = 20 x {misses} missed + 1 x " in out and "(50.0 % of them defective)" in out


def test_files_from_before_named_thresholds(model, synthetic_category, tmp_path, capsys):
    import defectscope
    from defectscope.cli.commands import main
    from defectscope.io import read_metadata, read_model_file, write_model_file

    tensors, meta = read_model_file(model)
    fit_value = meta["threshold"]
    # a file as fit wrote it before names existed
    before_names = {k: v for k, v in meta.items() if k not in ("thresholds", "active_threshold")}
    old = tmp_path / "old.dsmodel"
    write_model_file(old, tensors, before_names)
    data = old.read_bytes()
    m_old, m_new = defectscope.load(old), defectscope.load(model)
    assert m_old.thresholds == {"fit": fit_value} and m_old.threshold_name == "fit"
    paths = sorted((synthetic_category / "test").rglob("*.png"))
    a, b = m_old.predict(paths), m_new.predict(paths)
    assert [r.score for r in a] == [r.score for r in b] and [r.judgement for r in a] == [r.judgement for r in b]
    assert all(np.array_equal(x.anomaly_map, y.anomaly_map) for x, y in zip(a, b))
    assert old.read_bytes() == data  # reading and scoring never rewrite a model file

    # a file calibrated before names: the fit-time threshold is in its history
    calibrated = dict(before_names)
    calibrated.update(
        threshold=fit_value * 0.9,
        threshold_info={"rule": "target false-reject rate on good validation images", "target_fpr": 0.05},
        threshold_history=[
            {"threshold": fit_value, "threshold_info": meta["threshold_info"], "replaced": "2026-11-02T10:00:00+00:00"}
        ],
    )
    write_model_file(old, tensors, calibrated)
    m = defectscope.load(old)
    assert m.thresholds == {"fit": fit_value, "false-reject-0.05": fit_value * 0.9}
    assert m.threshold_name == "false-reject-0.05" and m.threshold == fit_value * 0.9
    assert m.predict(paths[0], threshold_name="fit").threshold == fit_value

    # calibrating it writes the names, keeping both older thresholds
    capsys.readouterr()
    assert main(["calibrate", str(old), str(synthetic_category / "test"), "--catch", "0.9", "--no-progress"]) == 0
    assert 'was "false-reject-0.05"' in capsys.readouterr()[0]
    new = read_metadata(old)
    assert list(defectscope.load(old).thresholds) == ["fit", "false-reject-0.05", "catch-0.9"]
    assert new["active_threshold"] == "catch-0.9"
    assert [h["threshold"] for h in new["threshold_history"]] == [fit_value, fit_value * 0.9]


def test_a_threshold_set_through_the_api_has_no_name(model, tmp_path):
    import defectscope

    m = defectscope.load(model)
    m.meta["threshold"] = m.threshold * 2
    m.save(tmp_path / "edited.dsmodel")
    edited = defectscope.load(tmp_path / "edited.dsmodel")
    assert edited.threshold_name is None and edited.thresholds["fit"] == m.threshold / 2


def test_batch_judges_at_a_named_threshold(model, synthetic_category, tmp_path, capsys):
    import csv

    from defectscope.batch import run_batch
    from defectscope.cli.commands import main
    from defectscope.io import read_metadata

    test = synthetic_category / "test"
    assert main(["calibrate", str(model), str(test), "--catch", "0.5", "--name", "lenient", "--no-activate"]) == 0
    value = read_metadata(model)["thresholds"]["lenient"]["value"]
    out = tmp_path / "rows.csv"
    run_batch(model, [str(test)], out, threshold_name="lenient", runtime="torch")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 20 and {float(r["threshold"]) for r in rows} == {value}
    assert all(int(r["judgement"]) == int(float(r["score"]) >= value) for r in rows)
    with pytest.raises(DefectscopeError, match="no threshold named 'strict'"):
        run_batch(model, [str(test)], tmp_path / "other.csv", threshold_name="strict", runtime="torch")
