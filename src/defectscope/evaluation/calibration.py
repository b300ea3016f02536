"""Calibrate a model's decision threshold on validation images and store it in the model file.

Four rules (an image is judged defective when ``score >= threshold``, as everywhere); each is
defined on the labelled images it is given, and the intervals around the rates it reaches are exact
binomial (Clopper-Pearson, :func:`defectscope.evaluation.operating.clopper_pearson`):

* **catch** (``catch=c``, needs defective images): the **highest** threshold that still catches at
  least ``ceil(c * n_defective)`` of the defective images, so that the fewest good parts are rejected.
  It is the ``ceil(c * n_defective)``-th highest defective score (:func:`threshold_at_catch`).
* **false reject** (``false_reject=r``, alias ``target_fpr``; good images suffice): the **lowest**
  threshold that rejects at most ``floor(r * n_good)`` of the good images, so that the most defects
  are caught: :func:`defectscope.evaluation.operating.threshold_at_false_reject` (the next float above
  the ``floor(r * n_good) + 1``-th highest good score), the same rule as the catch-rate table of
  ``evaluate``.
* **cost** (``cost_miss=C``, ``cost_reject=1``, needs both classes): the threshold of least expected
  cost ``C x misses + cost_reject x false rejects`` over the labelled images
  (:func:`threshold_of_least_cost`). Ties (equal cost within 1e-9 relative) go to the lower threshold,
  which catches more defects; the threshold is the lowest score among the images it rejects. The costs
  are summed over the images given, so their mix of good and defective images stands for the line's:
  on a set with defect share q, the threshold for a line with defect share p is the one for
  ``cost_miss x (p / (1 - p)) / (q / (1 - q))``.
* **F1** (``f1=True``, needs both classes): the threshold of the best image F1 (highest among ties).

How many images a rule needs, and the warning when there are fewer (:data:`MIN_IMAGES_PER_CLASS`):

* catch c < 1: at least ``ceil(1 / (1 - c))`` defective images (20 for 0.95). With fewer, missing even
  one defect falls below the target, so the threshold must catch them all: the target cannot be told
  from 100 %.
* false reject r > 0: at least ``ceil(1 / r)`` good images (100 for 0.01), for the same reason: with
  fewer, no good image may be rejected and the threshold sits just above the highest good score.
* cost and F1: at least :data:`MIN_IMAGES_PER_CLASS` images of each class.

Every result says how many images it rests on and carries ``warning`` when they are too few; the
CLI prints it, it is never dropped silently. Inputs a rule cannot use (a catch target outside (0, 1],
a cost rule on good images only) are refused by :meth:`Rule.check_labels` before any image is scored.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..errors import DataLayoutError, DefectscopeError
from . import metrics
from .operating import CONFIDENCE, rates_at, threshold_at_false_reject

log = logging.getLogger(__name__)

DEFAULT_TARGET_FPR = 0.01
#: a cost or F1 threshold resting on fewer images of either class than this is flagged
MIN_IMAGES_PER_CLASS = 10
MIN_F1_IMAGES_PER_CLASS = MIN_IMAGES_PER_CLASS
#: relative tolerance under which two expected costs count as equal (then the lower threshold wins)
COST_TIE_TOLERANCE = 1e-9


def false_reject_upper_bound(n_rejected: int, n_good: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on the true false-reject rate after seeing
    ``n_rejected`` of ``n_good`` good images rejected."""
    if n_good <= 0:
        return 1.0
    if n_rejected >= n_good:
        return 1.0
    return float(stats.beta.ppf(confidence, n_rejected + 1, n_good - n_rejected))


def catch_count(rate: float, n_defective: int) -> int:
    """How many of ``n_defective`` images a catch target ``rate`` in (0, 1] asks for: ``ceil(rate * n)``
    (0.95 of 141 is 134; a product within 1e-9 of a whole number counts as that number)."""
    return max(1, math.ceil(rate * n_defective - 1e-9))


def threshold_at_catch(defective_scores: np.ndarray, rate: float) -> float:
    """The highest threshold that catches at least ``ceil(rate * n)`` of the ``n`` defective scores (N,):
    the ``ceil(rate * n)``-th highest of them (every defective image scoring at least as high is caught).

    Raises DefectscopeError for a rate outside (0, 1] or no defective scores."""
    if not 0.0 < rate <= 1.0:
        raise DefectscopeError(f"catch rate {rate!r} must be in (0, 1]: e.g. 0.95 catches at least 95 % of defects")
    bad = np.sort(np.asarray(defective_scores, dtype=np.float64).ravel())[::-1]
    if bad.size == 0:
        raise DefectscopeError("no defective scores: a catch rate needs labelled defective images")
    return float(bad[catch_count(rate, bad.size) - 1])


def expected_costs(
    labels: np.ndarray, scores: np.ndarray, cost_miss: float, cost_reject: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Every threshold that gives a different outcome on these images, and its cost (both (K,), thresholds
    descending): "reject none" (the next float above the highest score), then each distinct score.
    cost = ``cost_miss`` x defective images below the threshold + ``cost_reject`` x good images at or above it."""
    y, s = metrics._labels_scores(labels, scores)
    good, bad = np.sort(s[~y]), np.sort(s[y])
    candidates = np.r_[np.nextafter(s.max(), np.inf), np.unique(s)[::-1]]
    misses = np.searchsorted(bad, candidates, side="left")  # defective scores below the threshold
    rejects = good.size - np.searchsorted(good, candidates, side="left")  # good scores at or above it
    return candidates, cost_miss * misses + cost_reject * rejects


def threshold_of_least_cost(
    labels: np.ndarray, scores: np.ndarray, cost_miss: float, cost_reject: float = 1.0
) -> float:
    """The threshold of least ``cost_miss x misses + cost_reject x false rejects`` over labels (N,) 0/1 and
    scores (N,); among equal costs (within :data:`COST_TIE_TOLERANCE` relative) the lowest threshold, which
    catches the most. Costs must be positive, finite numbers (DefectscopeError otherwise)."""
    for name, value in (("cost of a miss", cost_miss), ("cost of a false reject", cost_reject)):
        if not (math.isfinite(value) and value > 0):
            raise DefectscopeError(f"the {name} must be a positive number, got {value!r}")
    candidates, costs = expected_costs(labels, scores, cost_miss, cost_reject)
    best = costs.min()
    tied = np.flatnonzero(costs <= best + COST_TIE_TOLERANCE * max(1.0, abs(best)))
    return float(candidates[tied[-1]])  # candidates descend: the last tied one is the lowest threshold


@dataclass(frozen=True)
class Rule:
    """One calibration rule and its parameter; :func:`make_rule` builds and checks it."""

    kind: str  # "catch", "false_reject", "cost" or "f1"
    target: float | None = None  # the catch rate or false-reject rate
    cost_miss: float | None = None
    cost_reject: float = 1.0

    @property
    def short(self) -> str:
        """The rule in a few words, as stored with the threshold: ``catch >= 0.95``."""
        if self.kind == "catch":
            return f"catch >= {self.target:g}"
        if self.kind == "false_reject":
            return f"false-reject <= {self.target:g}"
        if self.kind == "cost":
            return f"least cost, miss {self.cost_miss:g} : false reject {self.cost_reject:g}"
        return "best image F1"

    @property
    def option(self) -> str:
        """The command-line option that asks for it, for messages."""
        if self.kind == "catch":
            return f"--catch {self.target:g}"
        if self.kind == "false_reject":
            return f"--false-reject {self.target:g}"
        if self.kind == "cost":
            return f"--cost-miss {self.cost_miss:g}"
        return "--f1"

    def check_labels(self, n_good: int, n_defective: int, source: str) -> None:
        """Refuse (DataLayoutError naming ``source`` and what to do) images this rule cannot use: call it
        before scoring them."""
        plain = (
            "; a folder without good/ is taken as good images only: give a labelled folder (good/ + one folder "
            "per defect type)"
        )
        if self.kind in ("catch", "cost", "f1") and n_defective == 0:
            other = "use --false-reject with good images only" if self.kind != "f1" else "use --false-reject"
            raise DataLayoutError(
                f"{self.option} needs labelled defective images, and {source} has none{plain}, or {other}"
            )
        if self.kind in ("false_reject", "cost", "f1") and n_good == 0:
            raise DataLayoutError(
                f"{self.option} needs good images, and {source} has none: give a folder with good/ (or of good images)"
            )


def make_rule(
    *,
    catch: float | None = None,
    false_reject: float | None = None,
    target_fpr: float | None = None,
    cost_miss: float | None = None,
    cost_reject: float | None = None,
    f1: bool = False,
) -> Rule:
    """The one rule asked for (none: false reject at :data:`DEFAULT_TARGET_FPR`); DefectscopeError naming the
    value for more than one rule or a value out of range. ``target_fpr`` is ``false_reject``'s older name."""
    if target_fpr is not None:
        if false_reject is not None and false_reject != target_fpr:
            raise DefectscopeError("--target-fpr is another name for --false-reject: give one of them")
        false_reject = target_fpr
    asked = [
        name
        for name, given in (
            ("--catch", catch is not None),
            ("--false-reject", false_reject is not None),
            ("--cost-miss", cost_miss is not None),
            ("--f1", f1),
        )
        if given
    ]
    if len(asked) > 1:
        raise DefectscopeError(f"choose one calibration rule, not {' and '.join(asked)}")
    if cost_reject is not None and cost_miss is None:
        raise DefectscopeError(
            f"--cost-reject {cost_reject:g} is the cost rule's second half: give --cost-miss too (the cost of a "
            "missed defect, in the same unit)"
        )
    if catch is not None:
        if not (isinstance(catch, (int, float)) and 0.0 < catch <= 1.0):
            raise DefectscopeError(
                f"--catch {catch!r} is out of range: give the share of defective images to catch, in (0, 1] "
                "(0.95 catches at least 95 %)"
            )
        return Rule("catch", float(catch))
    if cost_miss is not None:
        reject = 1.0 if cost_reject is None else cost_reject
        for name, value in (("--cost-miss", cost_miss), ("--cost-reject", reject)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise DefectscopeError(
                    f"{name} {value!r}: costs must be positive numbers (e.g. --cost-miss 20 --cost-reject 1: "
                    "a missed defect costs 20 times a good part thrown away)"
                )
        return Rule("cost", cost_miss=float(cost_miss), cost_reject=float(reject))
    if f1:
        return Rule("f1")
    target = DEFAULT_TARGET_FPR if false_reject is None else false_reject
    if not (isinstance(target, (int, float)) and 0.0 <= target < 1.0):
        raise DefectscopeError(
            f"--false-reject {target!r} is out of range: give the share of good parts that may be rejected, "
            "in [0, 1) (0.01 rejects at most 1 %)"
        )
    return Rule("false_reject", float(target))


def _percent(value: float) -> str:
    return f"{100 * value:.3g} %"


def calibrate_threshold(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    rule: Rule | None = None,
    catch: float | None = None,
    false_reject: float | None = None,
    target_fpr: float | None = None,
    cost_miss: float | None = None,
    cost_reject: float | None = None,
    f1: bool = False,
) -> dict[str, Any]:
    """A threshold from validation labels (N,) 0/1 and image scores (N,), with the evidence for it.

    Exactly one rule: ``rule``, or one of the keyword rules (see the module docstring; none: false reject
    at :data:`DEFAULT_TARGET_FPR`). Returns a dict: ``threshold``, ``rule`` (in words), ``rule_short``
    (``catch >= 0.95``), the rule's parameter (``target_catch``, ``target_fpr``, ``cost_miss`` and
    ``cost_reject``, or ``f1``: the F1 reached), the counts (``n_images``, ``n_good``, ``n_defective``),
    ``rates`` (:func:`~defectscope.evaluation.operating.rates_at` without the threshold: ``false_reject``
    and ``catch``, each {count, n, rate, ci}), ``false_reject_rate``, ``false_reject_upper95``
    (one-sided), with defects ``miss_rate`` and ``confusion``, with the cost rule ``expected_cost``,
    ``calibrated`` (the date), and ``warning`` when the images are too few for the rule.
    Raises DefectscopeError / DataLayoutError for inputs the rule cannot use.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise DefectscopeError(f"calibration needs one label per score, got {y.size} labels and {s.size} scores")
    if not np.isfinite(s).all():
        raise DefectscopeError("calibration scores contain NaN/inf; check the model and the images")
    if rule is None:
        rule = make_rule(
            catch=catch,
            false_reject=false_reject,
            target_fpr=target_fpr,
            cost_miss=cost_miss,
            cost_reject=cost_reject,
            f1=f1,
        )
    good, bad = s[y == 0], s[y == 1]
    rule.check_labels(int(good.size), int(bad.size), "the scored images")
    warnings: list[str] = []
    info: dict[str, Any]
    if rule.kind == "catch":
        assert rule.target is not None
        c = rule.target
        threshold = threshold_at_catch(bad, c)
        info = {
            "rule": f"highest threshold catching at least {_percent(c)} of the labelled defective images",
            "target_catch": c,
        }
        if c < 1.0:
            needed = math.ceil(1.0 / (1.0 - c) - 1e-9)
            if bad.size < needed:
                shown = math.ceil(math.log((1 - CONFIDENCE) / 2) / math.log(c))
                warnings.append(
                    f"the catch target {_percent(c)} rests on only {bad.size} defective images: with fewer than "
                    f"{needed}, missing even one falls below it, so the threshold must catch them all and the "
                    f"target cannot be told from 100 %. Calibrate on at least {needed} defective images (showing "
                    f">= {_percent(c)} at {_percent(CONFIDENCE)} confidence takes {shown} with none missed)"
                )
    elif rule.kind == "false_reject":
        assert rule.target is not None
        r = rule.target
        threshold = threshold_at_false_reject(good, r)
        info = {
            "rule": f"lowest threshold rejecting at most {_percent(r)} of the good validation images",
            "target_fpr": r,
        }
        if r == 0:
            warnings.append(
                f"a 0 % target rejects none of the {good.size} good validation images: the threshold is just above "
                "the highest good score, and a good part scoring higher later is rejected"
            )
        else:
            needed = math.ceil(1.0 / r - 1e-9)
            if good.size < needed:
                warnings.append(
                    f"threshold rests on only {good.size} good images: a {_percent(r)} false-reject rate needs at "
                    f"least {needed} to resolve (with fewer, none may be rejected), so it is just above the highest "
                    f"good score(s); calibrate on at least {needed} good images"
                )
    elif rule.kind == "cost":
        assert rule.cost_miss is not None
        threshold = threshold_of_least_cost(y, s, rule.cost_miss, rule.cost_reject)
        info = {
            "rule": (
                f"least expected cost on the labelled images: {rule.cost_miss:g} per missed defect, "
                f"{rule.cost_reject:g} per good part rejected"
            ),
            "cost_miss": rule.cost_miss,
            "cost_reject": rule.cost_reject,
        }
        if min(good.size, bad.size) < MIN_IMAGES_PER_CLASS:
            warnings.append(
                f"the least-cost threshold rests on only {good.size} good and {bad.size} defective images (fewer "
                f"than {MIN_IMAGES_PER_CLASS} of a class): it may not carry over; calibrate on at least "
                f"{MIN_IMAGES_PER_CLASS} of each"
            )
    else:
        best, threshold = metrics.f1_max(y, s)
        info = {"rule": "best image F1 on labelled validation images", "f1": best}
        if min(good.size, bad.size) < MIN_IMAGES_PER_CLASS:
            warnings.append(
                f"F1 threshold rests on only {good.size} good and {bad.size} defective images "
                f"(fewer than {MIN_IMAGES_PER_CLASS} of a class): it may not carry over; calibrate on more images"
            )
    rates = rates_at(y, s, threshold)
    rates.pop("threshold")
    rejected = rates["false_reject"]["count"]
    info.update(
        rule_short=rule.short,
        threshold=float(threshold),
        n_images=int(s.size),
        n_good=int(good.size),
        n_defective=int(bad.size),
        rates=rates,
        false_reject_rate=rejected / good.size if good.size else None,
        false_reject_upper95=false_reject_upper_bound(rejected, int(good.size)) if good.size else None,
        calibrated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if bad.size:
        info["miss_rate"] = float((bad < threshold).mean())
        info["confusion"] = metrics.confusion_at(y, s, threshold)
    if rule.kind == "cost":
        assert rule.cost_miss is not None
        misses = int(bad.size) - rates["catch"]["count"]
        info["expected_cost"] = rule.cost_miss * misses + rule.cost_reject * rejected
    if warnings:
        info["warning"] = " ".join(warnings)
    return info


def format_rate(rate: dict[str, Any]) -> str:
    """``134/141 = 95.0 % (95 % CI 90.0-98.0 %)`` from a {count, n, rate, ci} dict."""
    if not rate["n"]:
        return "not measured (no images of that class)"
    low, high = rate["ci"]
    return (
        f"{rate['count']}/{rate['n']} = {100 * rate['rate']:.1f} % "
        f"({_percent(CONFIDENCE)} CI {100 * low:.1f}-{100 * high:.1f} %)"
    )


def calibration_samples(data: Path, split: str | None = None) -> tuple[list[Path], np.ndarray, str]:
    """Validation images, labels (N,) and a phrase saying where they came from.

    A plain test folder (good/ + defect folders) gives labelled images; any other folder that is
    not a dataset category is taken as good images only (searched recursively). An MVTec AD
    category or VisA object holds the test split that ``evaluate`` reports on, so calibrating on it
    needs ``split="test"`` said explicitly (else DataLayoutError): the threshold is then tuned on
    the images it will be judged on, which makes evaluate's confusion matrix optimistic.
    """
    from ..data.layouts import find_images, is_category, load_category

    data = Path(data)
    if not data.is_dir():
        raise DataLayoutError(f"{data}: folder not found")
    if split is not None and not is_category(data):
        raise DataLayoutError(
            f"--split {split} is for a dataset category (MVTec AD, VisA); {data} is not one: leave --split out"
        )
    if is_category(data):
        if split != "test":
            raise DataLayoutError(
                f"{data} is a dataset category: calibrating on its test split tunes the threshold on the images "
                "`evaluate` reports on. Give a separate validation folder, or --split test to use that split anyway"
            )
        samples = load_category(data).test
        source = f"the test split of {data}"
    elif (data / "good").is_dir():
        samples = load_category(data).test
        source = f"the labelled folder {data}"
    else:
        paths = find_images(data)
        if not paths:
            raise DataLayoutError(f"{data}: no images found to calibrate on")
        return paths, np.zeros(len(paths), dtype=np.int64), f"{len(paths)} good images under {data}"
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return [s.path for s in samples], labels, source


def calibrate_model(
    model: Path,
    data: Path,
    *,
    catch: float | None = None,
    false_reject: float | None = None,
    target_fpr: float | None = None,
    cost_miss: float | None = None,
    cost_reject: float | None = None,
    f1: bool = False,
    name: str | None = None,
    activate: bool = True,
    batch_size: int = 16,
    progress: bool = False,
    split: str | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    """Score ``data`` with ``model``, compute the threshold by one rule (see :func:`calibrate_threshold`),
    and store it in the model file under ``name`` (default: the rule's own name, e.g. ``catch-0.95``;
    see :mod:`defectscope.thresholds`).

    ``activate`` (default) makes it the active threshold, the one every front end judges with; the one
    it replaces stays as a named entry and goes to ``threshold_history`` too. ``activate=False`` adds it
    as a named alternative only (``predict --threshold-name NAME``); recalibrating the active name
    always updates the active threshold. The name ``fit`` is the fit-time threshold's and is refused.

    Everything that can be checked without scoring is checked first, so that a user is not refused
    after the wait: the output (``model`` rewritten atomically in place, or ``output``, a new file),
    the rule and its values, the name, the folder and whether it has the labels the rule needs, and the
    model file itself. If writing still fails, the
    :class:`~defectscope.common.files.OutputError` raised names the threshold that was computed.
    Returns the calibration info plus ``name``, ``active`` (whether it is now the active threshold),
    ``previous_threshold`` and ``previous_name`` (the active one before), ``replaced`` (the entry of
    that name it replaced, or None), ``failed`` (images that could not be scored, left out),
    ``source`` (which images were used) and ``written`` (the model file written).
    """
    from ..common.files import OutputError, check_output_file, os_error_message
    from ..io import MODEL_FILE, load_model, read_model_file, update_metadata, write_model_file
    from ..judging import JudgeRule
    from ..scoring import score_paths
    from ..thresholds import (
        FIT_NAME,
        active_name,
        calibration_entry,
        check_name,
        named_thresholds,
        natural_name,
        with_threshold,
    )

    rule = make_rule(
        catch=catch,
        false_reject=false_reject,
        target_fpr=target_fpr,
        cost_miss=cost_miss,
        cost_reject=cost_reject,
        f1=f1,
    )
    if name is not None:
        check_name(name)
        if name == FIT_NAME:
            raise DefectscopeError(
                f"--name {FIT_NAME} is the fit-time threshold's name and is kept as fitted: choose another name"
            )
    target = Path(output) if output is not None else Path(model)
    check_output_file(target, "calibrated model file", replaces=MODEL_FILE)
    paths, labels, source = calibration_samples(data, split)
    n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    rule.check_labels(n_good, n_bad, source)
    detector, meta = load_model(model)
    log.info("calibrating (%s) on %s: %d good and %d defective images", rule.short, source, n_good, n_bad)
    old = float(meta["threshold"])
    kept_labels: list[int] = []
    kept_scores: list[float] = []
    failed: list[dict[str, str]] = []
    judge = JudgeRule.from_meta(meta)  # a model judged by region is calibrated on the rule's scores
    results = score_paths(detector, paths, old, batch_size=batch_size, progress=progress, rule=judge)
    for label, result in zip(labels, results):
        if result.ok:
            kept_labels.append(int(label))
            kept_scores.append(float(result.score))
        else:
            failed.append({"path": str(result.path), "error": result.error or ""})
    if not kept_scores:
        raise DataLayoutError(f"{data}: none of the {len(paths)} images could be scored")
    info = calibrate_threshold(np.array(kept_labels), np.array(kept_scores), rule=rule)
    info["data"] = str(data)
    info["source"] = source
    info["n_failed"] = len(failed)
    # info["warning"], when present, is the caller's to show (the CLI prints it once)
    name = name or natural_name(info)
    previous_name = active_name(meta)
    activate = activate or name == previous_name
    replaced = named_thresholds(meta).get(name)
    entry = calibration_entry(info, {"name": previous_name, "value": old})
    changes = with_threshold(meta, name, entry, activate=activate)
    if activate:
        changes["threshold_info"] = info
    try:
        if output is None:
            update_metadata(model, changes)
        else:
            tensors, full = read_model_file(model)
            full.update(changes)
            write_model_file(target, tensors, full)
    except (OSError, OutputError) as exc:
        why = os_error_message(exc, target) if isinstance(exc, OSError) else str(exc)
        raise OutputError(
            f"{why}; the calibrated threshold {info['threshold']:.6g} ({info['rule_short']}) was NOT saved: "
            f"pass it to predict with --threshold {info['threshold']:.6g}, or calibrate again with -o NEW_MODEL"
        ) from exc
    return {
        **info,
        "name": name,
        "active": activate,
        "previous_threshold": old,
        "previous_name": previous_name,
        "replaced": replaced,
        "failed": failed,
        "written": str(target),
    }
