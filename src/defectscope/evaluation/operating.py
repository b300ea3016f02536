"""Operating points: what a line feels at one threshold, read from image scores (pure numpy + scipy).

A line runs at one threshold and feels two rates there: the **false-reject rate** (the share of good
parts judged defective) and the **catch rate** (the share of defective parts judged defective, the
recall on defective images). Conventions are those of :mod:`.metrics`: higher score = more
anomalous, label 1 = defective, an image is judged defective when ``score >= threshold``.

* :func:`threshold_at_false_reject`: the lowest threshold that rejects at most ``floor(rate * n)``
  of ``n`` good scores. With ``n`` good images, rates below ``1 / n`` all mean "no good image
  rejected": the table says so with ``resolution``.
* :func:`operating_points`: the catch rate at false-reject rates 0.5, 1, 2 and 5 % (each with the
  threshold it needs), the two rates at a given threshold, and a row per defect type.
* Intervals are exact binomial (Clopper-Pearson) intervals from the counts,
  :func:`clopper_pearson`: Clopper & Pearson, "The use of confidence or fiducial limits illustrated
  in the case of the binomial", Biometrika 26 (1934).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import MetricInputError, _labels_scores

#: the false-reject rates the catch rate is reported at (fractions)
FALSE_REJECT_RATES: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)
#: the confidence of every interval reported
CONFIDENCE = 0.95


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided binomial interval for ``k`` successes in ``n`` trials; (0, 1) when n == 0."""
    from scipy.stats import beta

    if not 0 <= k <= n:
        raise MetricInputError(f"clopper_pearson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def _rate(k: int, n: int) -> dict[str, Any]:
    """``{"count", "n", "rate", "ci"}`` for k of n (rate None when n == 0)."""
    return {"count": int(k), "n": int(n), "rate": (k / n) if n else None, "ci": list(clopper_pearson(k, n))}


def threshold_at_false_reject(good_scores: np.ndarray, rate: float) -> float:
    """The lowest threshold rejecting at most ``floor(rate * n)`` of the ``n`` good scores (N,).

    That is the next float above the ``(floor(rate * n) + 1)``-th highest good score: every good
    image scoring at least as high as it is accepted. Raises :class:`MetricInputError` without good
    scores or for a rate outside [0, 1).
    """
    if not 0.0 <= rate < 1.0:
        raise MetricInputError(f"false-reject rate {rate!r} must be in [0, 1)")
    good = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    if good.size == 0:
        raise MetricInputError("no good scores: a false-reject rate needs good images")
    allowed = math.floor(rate * good.size + 1e-9)  # 1 % of 200 is 2, not 1.9999
    return float(np.nextafter(good[allowed], np.inf))


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The false-reject rate (on the good images) and catch rate (on the defective ones) at ``threshold``.

    Returns ``{"threshold", "false_reject": {count, n, rate, ci}, "catch": {count, n, rate, ci}}``.
    """
    y, s = _labels_scores(labels, scores)
    rejected = s >= threshold
    return {
        "threshold": float(threshold),
        "false_reject": _rate(int(np.count_nonzero(rejected & ~y)), int(np.count_nonzero(~y))),
        "catch": _rate(int(np.count_nonzero(rejected & y)), int(np.count_nonzero(y))),
    }


def operating_points(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float | None = None,
    types: Sequence[str] | None = None,
    rates: Sequence[float] = FALSE_REJECT_RATES,
) -> dict[str, Any]:
    """The trade-off between the two rates, read from image scores (N,) and labels (N,).

    Returns::

        {"n_good", "n_defective",
         "resolution": 1 / n_good (the smallest non-zero false-reject rate these images can show),
         "at_false_reject": [{"target", "threshold", "false_reject": {...}, "catch": {...}}, ...],
         "at_threshold": rates_at(threshold) or None,
         "per_type": {type: {"n", "catch_at_false_reject": [catch rate per target], "at_threshold": {...}}}}

    ``at_false_reject`` is empty when there are no good images (no false-reject rate can be read),
    and its catch rates are None without defective images.
    """
    y, s = _labels_scores(labels, scores)
    good, bad = s[~y], s[y]
    out: dict[str, Any] = {
        "n_good": int(good.size),
        "n_defective": int(bad.size),
        "resolution": (1.0 / good.size) if good.size else None,
        "at_false_reject": [],
        "at_threshold": rates_at(y, s, threshold) if threshold is not None else None,
        "per_type": {},
    }
    thresholds = [threshold_at_false_reject(good, r) for r in rates] if good.size else []
    for target, t in zip(rates, thresholds):
        row = rates_at(y, s, t)
        row["target"] = float(target)
        out["at_false_reject"].append(row)
    if types is not None:
        names = np.asarray(list(types), dtype=object)
        if names.shape != y.shape:
            raise MetricInputError(f"types ({names.size}) and labels ({y.size}) must have the same length")
        for name in dict.fromkeys(names[y].tolist()):
            mine = s[y & (names == name)]
            out["per_type"][str(name)] = {
                "n": int(mine.size),
                "catch_at_false_reject": [float(np.mean(mine >= t)) for t in thresholds],
                "at_threshold": None
                if threshold is None
                else _rate(int(np.count_nonzero(mine >= threshold)), mine.size),
            }
    return out


def catch_at_false_reject(labels: np.ndarray, scores: np.ndarray, rate: float = 0.01) -> float | None:
    """The catch rate at the lowest threshold with a false-reject rate of at most ``rate`` on the
    good images; None without good or without defective images."""
    y, s = _labels_scores(labels, scores)
    if not y.any() or y.all():
        return None
    return float(np.mean(s[y] >= threshold_at_false_reject(s[~y], rate)))


def rate_key(rate: float) -> str:
    """The flat name of the catch rate at false-reject rate ``rate``: 0.005 -> ``catch_at_fr_0.5pct``."""
    return "catch_at_fr_" + f"{rate * 100:.2f}".rstrip("0").rstrip(".") + "pct"


def flat_summary(op: dict[str, Any] | None) -> dict[str, float | None]:
    """The headline numbers of :func:`operating_points` as flat columns for benchmark tables.

    Keys: :func:`rate_key` of each false-reject rate (the catch rate there), ``catch_at_threshold``
    and ``false_reject_at_threshold`` (the two rates at the given threshold). A rate that cannot be
    read (no good or no defective images, no threshold, ``op`` None) is None.
    """
    out: dict[str, float | None] = {rate_key(r): None for r in FALSE_REJECT_RATES}
    out |= {"catch_at_threshold": None, "false_reject_at_threshold": None}
    if not op:
        return out
    for row in op["at_false_reject"]:
        out[rate_key(row["target"])] = row["catch"]["rate"]
    at = op.get("at_threshold")
    if at is not None:
        out["catch_at_threshold"] = at["catch"]["rate"]
        out["false_reject_at_threshold"] = at["false_reject"]["rate"]
    return out
