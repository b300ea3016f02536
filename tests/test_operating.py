"""Operating points against brute force: thresholds, rates and Clopper-Pearson intervals."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.evaluation.metrics import MetricInputError
from defectscope.evaluation.operating import (
    catch_at_false_reject,
    clopper_pearson,
    operating_points,
    rates_at,
    threshold_at_false_reject,
)


def _brute_catch(good: np.ndarray, bad: np.ndarray, rate: float) -> float:
    """Try every candidate threshold (each score and just above it); keep the lowest meeting the rate."""
    candidates = np.unique(np.concatenate([good, bad, np.nextafter(good, np.inf), np.nextafter(bad, np.inf)]))
    allowed = np.floor(rate * good.size + 1e-9)
    for t in candidates:  # ascending: the first one meeting the false-reject budget is the lowest
        if np.count_nonzero(good >= t) <= allowed:
            return float(np.mean(bad >= t))
    return 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rate", [0.0, 0.005, 0.01, 0.05, 0.2])
def test_catch_rate_matches_brute_force(seed, rate):
    rng = np.random.default_rng(seed)
    n_good, n_bad = rng.integers(5, 300), rng.integers(1, 100)
    good = np.round(rng.normal(0, 1, n_good), 1)  # rounded: ties between and within the classes
    bad = np.round(rng.normal(1.5, 1, n_bad), 1)
    labels = np.r_[np.zeros(n_good), np.ones(n_bad)]
    scores = np.r_[good, bad]
    assert catch_at_false_reject(labels, scores, rate) == pytest.approx(_brute_catch(good, bad, rate))
    t = threshold_at_false_reject(good, rate)
    assert np.count_nonzero(good >= t) <= np.floor(rate * n_good + 1e-9)
    assert np.count_nonzero(good >= np.nextafter(t, -np.inf)) > np.floor(rate * n_good + 1e-9)  # the lowest


def test_one_percent_of_two_hundred_allows_two():
    good = np.arange(200, dtype=float)
    t = threshold_at_false_reject(good, 0.01)
    assert np.count_nonzero(good >= t) == 2 and t > 197


def test_clopper_pearson_against_known_values():
    # the textbook values (e.g. R's binom.test): 0 of 10, 10 of 10, 5 of 10 at 95 %
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.3084971), abs=1e-6)
    assert clopper_pearson(10, 10) == pytest.approx((0.6915029, 1.0), abs=1e-6)
    assert clopper_pearson(5, 10) == pytest.approx((0.1870860, 0.8129140), abs=1e-6)
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    with pytest.raises(MetricInputError, match="0 <= k <= n"):
        clopper_pearson(3, 2)


def test_clopper_pearson_covers_at_least_its_confidence():
    rng = np.random.default_rng(0)
    p, n = 0.03, 200
    ks = rng.binomial(n, p, size=2000)
    covered = np.mean([lo <= p <= hi for lo, hi in (clopper_pearson(int(k), n) for k in ks)])
    assert covered >= 0.95


def test_operating_points_table():
    good = np.linspace(0, 1, 100)
    bad = np.r_[np.linspace(0.5, 2, 40), np.linspace(1.5, 3, 10)]
    labels = np.r_[np.zeros(100), np.ones(50)]
    types = ["good"] * 100 + ["crack"] * 40 + ["hole"] * 10
    out = operating_points(labels, np.r_[good, bad], threshold=0.995, types=types)
    assert out["n_good"] == 100 and out["n_defective"] == 50 and out["resolution"] == pytest.approx(0.01)
    by_target = {row["target"]: row for row in out["at_false_reject"]}
    assert set(by_target) == {0.005, 0.01, 0.02, 0.05}
    one = by_target[0.01]
    assert one["false_reject"]["count"] == 1 and one["false_reject"]["rate"] == pytest.approx(0.01)
    assert one["catch"]["rate"] == pytest.approx(np.mean(bad >= one["threshold"]))
    lo, hi = one["catch"]["ci"]
    assert lo < one["catch"]["rate"] < hi
    assert out["at_threshold"] == rates_at(labels, np.r_[good, bad], 0.995)
    assert out["at_threshold"]["false_reject"]["count"] == 1  # 1.0 only
    assert out["per_type"]["hole"]["catch_at_false_reject"] == [1.0] * 4
    assert out["per_type"]["crack"]["n"] == 40


def test_without_good_images_no_false_reject_rate_is_read():
    out = operating_points(np.ones(5), np.arange(5.0), threshold=2.0)
    assert out["at_false_reject"] == [] and out["resolution"] is None
    assert out["at_threshold"]["catch"]["count"] == 3 and out["at_threshold"]["false_reject"]["rate"] is None
    assert catch_at_false_reject(np.ones(5), np.arange(5.0)) is None


def test_bad_inputs_are_refused():
    with pytest.raises(MetricInputError):
        threshold_at_false_reject(np.array([]), 0.01)
    with pytest.raises(MetricInputError):
        threshold_at_false_reject(np.array([1.0]), 1.0)
    with pytest.raises(MetricInputError):
        operating_points(np.array([0, 1]), np.array([0.0, np.nan]))
