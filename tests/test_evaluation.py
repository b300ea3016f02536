"""evaluate_detector against brute-force references, with a stand-in detector (no backbone needed)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from defectscope.data.images import load_mask
from defectscope.data.layouts import load_category
from defectscope.detectors.base import Prediction
from defectscope.evaluation import metrics
from defectscope.evaluation.evaluate import evaluate_detector, image_metrics, normalized_score, pixel_roc_curve

SIZE = 64


class ColourDetector:
    """Anomaly map = distance of each pixel's colour from the image's median colour; score = map max.

    Records every map it hands out so tests can compute reference metrics by brute force.
    """

    method = "colour"
    backbone = "none"
    layers: ClassVar[list[str]] = ["rgb"]
    image_size = SIZE
    input_shape = (SIZE, SIZE)  # what the loader resizes photos to
    resize = "stretch"
    input_stats = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __init__(self) -> None:
        self.maps: list[np.ndarray] = []

    def predict(self, images: torch.Tensor) -> Prediction:
        med = images.flatten(2).median(dim=2).values[:, :, None, None]
        maps = torch.nn.functional.avg_pool2d(((images - med) ** 2).sum(1, keepdim=True), 5, 1, 2)[:, 0]
        maps = maps.numpy().astype(np.float32)
        self.maps.extend(maps)
        return Prediction(maps.reshape(len(maps), -1).max(1), maps)


@pytest.fixture(scope="module")
def evaluated(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory):
    split = load_category(synthetic_category)
    detector = ColourDetector()
    overlays = tmp_path_factory.mktemp("overlays")
    result = evaluate_detector(detector, split, threshold=0.05, overlay_dir=overlays, overlay_max_side=48)
    return split, detector, result, overlays


def test_image_metrics_match_brute_force(evaluated):
    _split, _, result, _ = evaluated
    labels = np.array([r["label"] for r in result["images"]])
    scores = np.array([r["score"] for r in result["images"]])
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    # F1-max by trying every threshold
    best = max(
        (2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + (labels == 1).sum()), t) for t in scores
    )
    assert result["image_f1_max"] == pytest.approx(best[0])
    assert (scores >= result["image_f1_threshold"]).sum() >= 1
    types = np.array([r["defect_type"] for r in result["images"]])
    for name in ("scratch", "spot"):
        keep = (types == "good") | (types == name)
        assert result["per_type_auroc"][name] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        assert result["per_type"][name]["n"] == int((types == name).sum())
        assert result["per_type"][name]["flagged"] == int((scores[types == name] >= 0.05).sum())
    c = result["confusion"]
    assert c["tp"] + c["fn"] == result["n_defective"] == 10 and c["tn"] + c["fp"] == result["n_good"] == 10


def test_pixel_metrics_match_brute_force(evaluated):
    split, detector, result, _ = evaluated
    masks = [
        load_mask(s.mask_path, size=(SIZE, SIZE)) if s.mask_path else np.zeros((SIZE, SIZE), bool) for s in split.test
    ]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in detector.maps])
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert result["pixel_auroc_exact"] is True
    # the stored pixel ROC curve integrates to the AUROC (thinned to ~512 points, so loosely)
    roc = result["curves"]["pixel_roc"]
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(result["pixel_auroc"], abs=0.01)
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and np.all(np.diff(roc["fpr"]) >= 0)
    # AUPRO: PRO at a few thresholds by brute force, the stored curve passes through them
    assert 0.0 < result["aupro"] <= 1.0 and result["aupro_fpr_limit"] == 0.3
    pro = result["curves"]["pro"]
    assert pro["fpr"][0] == 0 and max(pro["fpr"]) >= 0.3 - 1e-9 and len(pro["fpr"]) <= 520
    pm = metrics.PixelMetrics()
    for amap, mask in zip(detector.maps, masks):
        pm.add(amap, mask)
    assert result["aupro"] == pytest.approx(pm.aupro(0.3))
    f1, t = result["pixel_f1_max"], result["pixel_f1_threshold"]
    pred = s >= t
    assert f1 == pytest.approx(2 * (pred & y).sum() / (pred.sum() + y.sum()), rel=1e-6)


def test_curves_are_short_and_maps_are_not_kept(evaluated):
    _, _, result, _overlays = evaluated
    assert "maps" not in result and all("map" not in r for r in result["images"])
    for curve in result["curves"].values():
        assert curve is not None and all(len(v) <= 520 for v in curve.values())
    import json

    json.dumps(result, allow_nan=False)  # strict JSON: no NaN anywhere


def test_overlays_written_small_and_linked(evaluated):
    _, _, result, overlays = evaluated
    from defectscope.data.images import load_image

    for r in result["images"]:
        png = overlays / r["overlay"]
        assert png.is_file() and r["overlay"].startswith(r["defect_type"] + "/")
        assert max(load_image(png).shape[:2]) <= 48
        assert r["normalized_score"] == pytest.approx(r["score"] / 0.05)


def test_image_metrics_one_class_gives_none():
    out = image_metrics(np.zeros(4, np.int64), np.arange(4.0), ["good"] * 4, threshold=2.0)
    assert out["image_auroc"] is None and out["image_f1_max"] is None and out["_image_roc"] is None
    assert out["confusion"] == {"tp": 0, "fp": 2, "tn": 2, "fn": 0}
    assert out["per_type"]["good"]["flagged"] == 2


def test_pixel_roc_curve_binned_mode_matches_exact():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 32, 32)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[:3, 10:20, 10:20] = True
    maps[masks] += 1.5
    exact, binned = metrics.PixelMetrics(), metrics.PixelMetrics(max_bytes=64)
    exact.add(maps, masks)
    binned.add(maps, masks)
    assert exact.exact and not binned.exact
    fe, te = pixel_roc_curve(exact)
    fb, tb = pixel_roc_curve(binned)
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert np.trapezoid(te, fe) == pytest.approx(ref, abs=2e-3)
    assert np.trapezoid(tb, fb) == pytest.approx(ref, abs=5e-3)


def test_normalized_score():
    assert normalized_score(2.0, 4.0) == 0.5
    assert normalized_score(2.0, 0.0) is None and normalized_score(None, 1.0) is None


# ----------------------------------------------------------------------------- operating points


def _brute_operating_point(good: np.ndarray, bad: np.ndarray, rate: float) -> tuple[float, int, int]:
    """(threshold, good rejected, defective caught) at the lowest threshold rejecting at most
    floor(rate * n) good images: every score and the float just above it is tried, lowest first."""
    candidates = np.unique(np.r_[good, bad, np.nextafter(good, np.inf), np.nextafter(bad, np.inf)])
    allowed = np.floor(rate * good.size + 1e-9)
    t = next(t for t in candidates if np.count_nonzero(good >= t) <= allowed)
    return float(t), int(np.count_nonzero(good >= t)), int(np.count_nonzero(bad >= t))


def _check_interval(part: dict) -> None:
    """The interval is Clopper-Pearson's: each end is where the binomial tail holds 2.5 %."""
    from scipy.stats import binom

    k, n = part["count"], part["n"]
    low, high = part["ci"]
    assert low <= part["rate"] <= high
    assert low == 0.0 if k == 0 else binom.sf(k - 1, n, low) == pytest.approx(0.025, abs=1e-6)
    assert high == 1.0 if k == n else binom.cdf(k, n, high) == pytest.approx(0.025, abs=1e-6)


def _check_against_brute_force(op: dict, labels: np.ndarray, scores: np.ndarray, types: list[str], threshold: float):
    good, bad = scores[labels == 0], scores[labels == 1]
    assert op["n_good"] == good.size and op["n_defective"] == bad.size
    assert op["resolution"] == pytest.approx(1 / good.size)
    assert [row["target"] for row in op["at_false_reject"]] == [0.005, 0.01, 0.02, 0.05]
    names = np.asarray(types)
    for i, row in enumerate(op["at_false_reject"]):
        t, rejected, caught = _brute_operating_point(good, bad, row["target"])
        assert row["threshold"] == t
        assert (row["false_reject"]["count"], row["false_reject"]["n"]) == (rejected, good.size)
        assert (row["catch"]["count"], row["catch"]["n"]) == (caught, bad.size)
        assert row["catch"]["rate"] == pytest.approx(caught / bad.size)
        _check_interval(row["catch"])
        _check_interval(row["false_reject"])
        for name, d in op["per_type"].items():
            assert d["catch_at_false_reject"][i] == pytest.approx(np.mean(scores[names == name] >= t))
    at = op["at_threshold"]
    assert at["threshold"] == threshold
    assert at["false_reject"]["count"] == int(np.count_nonzero(good >= threshold))
    assert at["catch"]["count"] == int(np.count_nonzero(bad >= threshold))
    _check_interval(at["catch"])
    assert set(op["per_type"]) == set(names[labels == 1])
    for name, d in op["per_type"].items():
        mine = scores[names == name]
        assert d["n"] == mine.size and d["at_threshold"]["count"] == int(np.count_nonzero(mine >= threshold))


def test_operating_points_of_evaluate_match_brute_force(evaluated):
    _, _, result, _ = evaluated
    labels = np.array([r["label"] for r in result["images"]])
    scores = np.array([r["score"] for r in result["images"]])
    types = [r["defect_type"] for r in result["images"]]
    _check_against_brute_force(result["operating_points"], labels, scores, types, 0.05)
    assert result["null_reasons"] == {}


@pytest.mark.parametrize("seed", range(4))
def test_operating_points_of_image_metrics_match_brute_force(seed):
    # hundreds of good images, so that 0.5 % and 1 % are told apart; rounded scores tie
    rng = np.random.default_rng(seed)
    n_good, n_a, n_b = int(rng.integers(150, 500)), int(rng.integers(5, 60)), int(rng.integers(5, 60))
    scores = np.round(np.r_[rng.normal(0, 1, n_good), rng.normal(2, 1, n_a), rng.normal(3, 1.5, n_b)], 2)
    labels = np.r_[np.zeros(n_good, np.int64), np.ones(n_a + n_b, np.int64)]
    types = ["good"] * n_good + ["crack"] * n_a + ["hole"] * n_b
    threshold = float(np.quantile(scores[:n_good], 0.97))
    out = image_metrics(labels, scores, types, threshold)
    _check_against_brute_force(out["operating_points"], labels, scores, types, threshold)


def test_summary_shows_the_operating_point_table(evaluated):
    from defectscope.evaluation.evaluate import format_summary

    _, _, result, _ = evaluated
    text = format_summary(result)
    op = result["operating_points"]
    assert "operating points" in text and "defective caught" in text
    rows = {line.split()[2]: line for line in text.splitlines() if line.strip().startswith("at most")}
    assert list(rows) == ["0.5", "1", "2", "5"]
    for row in op["at_false_reject"]:
        line = rows[f"{row['target'] * 100:g}"]
        assert f"{row['catch']['count']}/{row['catch']['n']}" in line
        assert f"{row['false_reject']['count']}/{row['false_reject']['n']}" in line
    own = next(line for line in text.splitlines() if line.strip().startswith("model threshold"))
    assert f"{op['at_threshold']['catch']['count']}/10" in own
    # 10 good images: one false reject is 10 %, so every row means "none rejected"
    assert "with 10 good images one false reject is 10 %, so the rows at 0.5 %, 1 %, 2 %, 5 % all mean none" in text
    for name in ("scratch", "spot"):
        assert any(line.split()[:2] == [name, "5"] for line in text.splitlines())


def test_no_resolution_note_with_enough_good_images():
    from defectscope.evaluation.evaluate import format_operating_points

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(400, np.int64), np.ones(30, np.int64)]
    scores = np.r_[rng.normal(0, 1, 400), rng.normal(3, 1, 30)]
    text = "\n".join(
        format_operating_points(image_metrics(labels, scores, ["good"] * 400 + ["x"] * 30, 2.0)["operating_points"])
    )
    assert "resolution" not in text
    labels, scores = labels[250:], scores[250:]  # 150 good: 0.5 % cannot be told from none
    text = "\n".join(
        format_operating_points(image_metrics(labels, scores, ["good"] * 150 + ["x"] * 30, 2.0)["operating_points"])
    )
    assert "with 150 good images one false reject is 0.7 %, so the row at 0.5 % means none of them rejected" in text


@pytest.fixture(scope="module")
def defects_only(synthetic_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic category without test/good."""
    import shutil

    folder = tmp_path_factory.mktemp("defects_only") / "widget"
    shutil.copytree(synthetic_category, folder)
    shutil.rmtree(folder / "test" / "good")
    return folder


def test_no_good_test_images_say_why_and_where(defects_only, caplog):
    from defectscope.evaluation.evaluate import format_summary

    split = load_category(defects_only)
    with caplog.at_level("WARNING", logger="defectscope.evaluation.evaluate"):
        result = evaluate_detector(ColourDetector(), split, threshold=0.05)
    where = f"{defects_only / 'test' / 'good'}/"
    assert any("no good test images" in r.getMessage() and where in r.getMessage() for r in caplog.records)
    assert result["n_good"] == 0 and result["n_defective"] == 10
    assert result["image_auroc"] is None and "hold out some good photos" in result["null_reasons"]["image_auroc"]
    assert where in result["null_reasons"]["image_auroc"] and "MVTec AD" in result["null_reasons"]["image_auroc"]
    # F1 with defective images only would read 1.0 (precision is 1 at every threshold): null, with the reason
    assert result["image_f1_max"] is None and result["image_f1_threshold"] is None
    assert "F1 1.0" in result["null_reasons"]["image_f1_max"]
    # the catch rate at the threshold is still read; no false-reject rate, no table rows
    scores = np.array([r["score"] for r in result["images"]])
    op = result["operating_points"]
    assert op["at_false_reject"] == [] and op["resolution"] is None
    assert op["at_threshold"]["catch"]["count"] == int(np.count_nonzero(scores >= 0.05))
    assert op["at_threshold"]["false_reject"]["rate"] is None
    text = format_summary(result)
    assert "image_auroc       null (no good test images" in text and where in text
    own = next(line for line in text.splitlines() if line.strip().startswith("model threshold"))
    assert "no good images" in own and f"{op['at_threshold']['catch']['count']}/10" in own
    import json

    json.dumps(result, allow_nan=False)


def test_no_good_images_hint_names_the_plain_folder(tmp_path):
    from defectscope.data.samples import Sample
    from defectscope.evaluation.evaluate import no_good_images_reason

    plain = [Sample(path=tmp_path / "parts" / "crack" / "a.png", label=1, defect_type="crack")]
    assert f"put them in {tmp_path / 'parts' / 'good'}/ (the plain folder's good images" in no_good_images_reason(plain)
    visa = [Sample(path=tmp_path / "candle" / "test" / "Anomaly" / "a.png", label=1, defect_type="Anomaly")]
    assert f"{tmp_path / 'candle' / 'test' / 'Normal'}/ (the VisA object's" in no_good_images_reason(visa)


def test_f1_max_is_null_without_good_images_and_would_read_one():
    labels, scores = np.ones(5, np.int64), np.array([0.1, 0.4, 0.2, 0.9, 0.3])
    assert metrics.f1_max(labels, scores)[0] == 1.0  # what the metric itself says: meaningless here
    out = image_metrics(labels, scores, ["x"] * 5, threshold=0.25)
    assert out["image_f1_max"] is None and "image_f1_max" in out["null_reasons"]
