"""Calibrate a model's decision threshold on validation images and store it in the model file.

Two rules (an image is judged defective when ``score >= threshold``, as everywhere):

* target false-reject rate (``target_fpr``): the lowest threshold at which at most
  ``floor(target_fpr * n_good)`` of the good validation images are rejected, placed halfway
  to the next higher good score (just above the highest good score when none may be rejected).
  Works with good images only; with labelled defects the resulting miss rate is reported too.
* F1 (``f1=True``, needs defective images): the threshold of the best image-level F1.

Every result says how many images it rests on, and carries a ``warning`` when they are too few
to pin the rule down; the CLI prints it, it is never dropped silently.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..errors import DataLayoutError, DefectscopeError
from . import metrics

log = logging.getLogger(__name__)

DEFAULT_TARGET_FPR = 0.01
#: an F1 threshold resting on fewer images of either class than this is flagged
MIN_F1_IMAGES_PER_CLASS = 10
#: confidence level of the reported upper bound on the false-reject rate
CONFIDENCE = 0.95


def false_reject_upper_bound(n_rejected: int, n_good: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on the true false-reject rate after seeing
    ``n_rejected`` of ``n_good`` good images rejected."""
    if n_good <= 0:
        return 1.0
    if n_rejected >= n_good:
        return 1.0
    return float(stats.beta.ppf(confidence, n_rejected + 1, n_good - n_rejected))


def threshold_for_fpr(good_scores: np.ndarray, target_fpr: float) -> float:
    """The target-false-reject-rate threshold of good-image scores (N,) (rule in the module docstring)."""
    s = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]  # descending
    allowed = math.floor(target_fpr * s.size + 1e-9)
    if allowed >= s.size:
        return float(s[-1])
    if allowed == 0:
        return float(np.nextafter(s[0], np.inf))  # reject none: just above the highest
    return (
        float(0.5 * (s[allowed] + s[allowed - 1]))
        if s[allowed] < s[allowed - 1]
        else float(np.nextafter(s[allowed], np.inf))
    )


def calibrate_threshold(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    target_fpr: float | None = None,
    f1: bool = False,
) -> dict[str, Any]:
    """A threshold from validation labels (N,) 0/1 and image scores (N,), with how it was made.

    Exactly one rule: ``f1=True`` or ``target_fpr`` (default :data:`DEFAULT_TARGET_FPR`).
    Returns ``threshold_info``-style dict: threshold, rule, counts, the rates it reaches on
    these images, an upper bound on the false-reject rate and, when it rests on too few
    images, ``warning``.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise DefectscopeError(f"calibration needs one label per score, got {y.size} labels and {s.size} scores")
    if not np.isfinite(s).all():
        raise DefectscopeError("calibration scores contain NaN/inf; check the model and the images")
    good, bad = s[y == 0], s[y == 1]
    if f1 and target_fpr is not None:
        raise DefectscopeError("choose one calibration rule: --target-fpr or --f1, not both")
    warnings: list[str] = []
    if f1:
        if bad.size == 0:
            raise DataLayoutError("--f1 needs defective validation images; with good images only use --target-fpr")
        if good.size == 0:
            raise DataLayoutError("--f1 needs good validation images too")
        best, threshold = metrics.f1_max(y, s)
        info: dict[str, Any] = {"rule": "best image F1 on labelled validation images", "f1": best}
        if min(good.size, bad.size) < MIN_F1_IMAGES_PER_CLASS:
            warnings.append(
                f"F1 threshold rests on only {good.size} good and {bad.size} defective images "
                f"(fewer than {MIN_F1_IMAGES_PER_CLASS} of a class): it may not carry over; calibrate on more images"
            )
    else:
        target = DEFAULT_TARGET_FPR if target_fpr is None else float(target_fpr)
        if not 0.0 <= target < 1.0:
            raise DefectscopeError(f"--target-fpr must be in [0, 1), got {target}")
        if good.size == 0:
            raise DataLayoutError("calibration with --target-fpr needs good validation images; none were scored")
        threshold = threshold_for_fpr(good, target)
        info = {"rule": "target false-reject rate on good validation images", "target_fpr": target}
        needed = math.ceil(1.0 / target) if target > 0 else None
        if needed is None:
            warnings.append(
                f"a 0 % target rejects none of the {good.size} good validation images: the threshold is just above "
                "the highest good score, and a good part scoring higher later is rejected"
            )
        elif good.size < needed:
            warnings.append(
                f"threshold rests on only {good.size} good images: a {target:.2%} false-reject rate needs at least "
                f"{needed} to resolve, so it is just above the highest good score(s); calibrate on more good images"
            )
    rejected = int((good >= threshold).sum())
    info.update(
        threshold=float(threshold),
        n_images=int(s.size),
        n_good=int(good.size),
        n_defective=int(bad.size),
        false_reject_rate=rejected / good.size if good.size else None,
        false_reject_upper95=false_reject_upper_bound(rejected, int(good.size)) if good.size else None,
        calibrated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if bad.size:
        info["miss_rate"] = float((bad < threshold).mean())
        info["confusion"] = metrics.confusion_at(y, s, threshold)
    if warnings:
        info["warning"] = " ".join(warnings)
    return info


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
    target_fpr: float | None = None,
    f1: bool = False,
    batch_size: int = 16,
    progress: bool = False,
    split: str | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    """Score ``data`` with ``model``, compute the threshold, write it into the model file.

    The old threshold and its info are appended to metadata ``threshold_history``. The model
    is rewritten atomically in place, or written to ``output`` (a new file; ``model`` is left as it
    is). Where it goes is checked before any image is scored; if writing still fails, the
    :class:`~defectscope.common.files.OutputError` raised names the threshold that was computed.
    Returns the new threshold info plus ``previous_threshold``, ``failed`` (images that could
    not be scored, left out of the calibration), ``source`` (which images were used) and
    ``written`` (the model file written).
    """
    from ..common.files import OutputError, check_output_file, os_error_message
    from ..io import MODEL_FILE, load_model, read_model_file, update_metadata, write_model_file
    from ..judging import JudgeRule
    from ..scoring import score_paths

    target = Path(output) if output is not None else Path(model)
    check_output_file(target, "calibrated model file", replaces=MODEL_FILE)
    detector, meta = load_model(model)
    paths, labels, source = calibration_samples(data, split)
    log.info(
        "calibrating on %s: %d good and %d defective images", source, int((labels == 0).sum()), int((labels == 1).sum())
    )
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
    info = calibrate_threshold(np.array(kept_labels), np.array(kept_scores), target_fpr=target_fpr, f1=f1)
    info["data"] = str(data)
    info["source"] = source
    info["n_failed"] = len(failed)
    # info["warning"], when present, is the caller's to show (the CLI prints it once)
    history = list(meta.get("threshold_history") or [])
    history.append({"threshold": old, "threshold_info": meta.get("threshold_info"), "replaced": info["calibrated"]})
    changes = {"threshold": info["threshold"], "threshold_info": info, "threshold_history": history}
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
            f"{why}; the calibrated threshold {info['threshold']:.6g} ({info['rule']}) was NOT saved: "
            f"pass it to predict with --threshold {info['threshold']:.6g}, or calibrate again with -o NEW_MODEL"
        ) from exc
    return {**info, "previous_threshold": old, "failed": failed, "written": str(target)}
