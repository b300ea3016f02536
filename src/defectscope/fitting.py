"""Fit a detector on a folder of good images and derive its decision threshold."""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common.progress import progress_bar
from .data.geometry import size_text
from .data.loader import iter_batches
from .detectors.base import Detector
from .errors import DataLayoutError, DefectscopeError
from .thresholds import FIT_NAME, fit_entry

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD_QUANTILE = 0.99
#: below this many leave-one-out scores a high quantile is close to the maximum: say so
FEW_THRESHOLD_IMAGES = 50


def pixel_threshold_from_maxima(maxima: np.ndarray, quantile: float = DEFAULT_THRESHOLD_QUANTILE) -> dict[str, Any]:
    """The pixel threshold: the ``quantile`` of the anomaly-map maxima (T,) of held-out good training
    images, so about (1 - quantile) of good images have any pixel at or above it. It is on the
    map's scale, which for SPADE (and, after re-weighting, PatchCore) is not the image score's."""
    maxima = np.asarray(maxima, dtype=np.float64)
    return {
        "threshold": float(np.quantile(maxima, quantile)),
        "quantile": quantile,
        "n_images": int(maxima.size),
        "rule": "quantile of the anomaly-map maxima of held-out good training images",
    }


def _check_quantile(quantile: float) -> None:
    if not 0 < quantile < 1:  # also false for NaN
        raise DefectscopeError(f"threshold quantile must be in (0, 1), got {quantile}")


def threshold_from_scores(
    scores: np.ndarray, quantile: float = DEFAULT_THRESHOLD_QUANTILE, kind: str = "leave-one-image-out"
) -> dict[str, Any]:
    """The decision threshold from held-out scores of good training images (``kind`` says how held out).

    Rule: the ``quantile`` (linear interpolation) of those scores, i.e. the model is expected to
    reject about (1 - quantile) of good parts. Returns the threshold and how it was made,
    including a warning when it rests on too few images to estimate that quantile.
    """
    _check_quantile(quantile)
    scores = np.asarray(scores, dtype=np.float64)
    n = int(scores.size)
    info: dict[str, Any] = {
        "threshold": float(np.quantile(scores, quantile)),
        "rule": f"quantile of {kind} scores of the good training images",
        "quantile": quantile,
        "n_images": n,
        "score_mean": float(scores.mean()),
        "score_std": float(scores.std()),
        "score_max": float(scores.max()),
    }
    if n < FEW_THRESHOLD_IMAGES or n * (1 - quantile) < 1:
        info["warning"] = (
            f"threshold rests on only {n} good images: the {quantile:.0%} quantile is poorly estimated "
            "(close to the highest training score); calibrate it on more good images"
        )
    return info


#: modified z-score (Iglewicz & Hoaglin 1993: 0.6745 (x - median) / MAD) above which a training
#: image's held-out score marks it as unlike the other good images. Held-out scores of good images
#: have a long right tail: at 3.5 (the textbook cutoff) clean bottle flagged 6 of 209 images; at
#: 5, clean bottle / pill / ELPV mono flag 2 / 0 / 2, while a defective bottle image planted among
#: 55 good ones scored 11-23 and a pill scratch 6.3 (README, "The threshold")
OUTLIER_Z = 5.0
#: fewer held-out scores than this cannot tell an outlier from the spread (a robust z of 5 scores is noise)
MIN_OUTLIER_IMAGES = 20
#: a training image whose shorter side is below the model input's shorter side / this is "far smaller than the
#: model input"
TINY_FACTOR = 4


def score_outliers(scores: np.ndarray, z: float = OUTLIER_Z) -> tuple[np.ndarray, float]:
    """Positions of high outliers among held-out training scores (N,), and the score above which
    they lie: median + z x MAD / 0.6745 (a robust z-score, so the outliers do not hide themselves
    by inflating the spread). Only high scores count: an image too unlike the rest. With MAD = 0
    (half the scores equal) or fewer than 20 scores nothing is flagged."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < MIN_OUTLIER_IMAGES:
        return np.zeros(0, dtype=np.int64), float("inf")
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median)))
    if mad == 0.0:
        return np.zeros(0, dtype=np.int64), float("inf")
    cutoff = median + z * mad / 0.6745
    return np.nonzero(scores > cutoff)[0], cutoff


def _input_text(detector: Detector) -> str:
    """The model input in words: ``256x256``, or with tiles ``448x448 (2 x 2 tiles of 256x256)``."""
    tiles = getattr(detector, "tiles", 1)
    text = size_text(detector.input_shape)
    return f"{text} ({tiles} x {tiles} tiles of {size_text(detector.image_size)})" if tiles > 1 else text


def _suspects(
    detector: Detector, loaded: list[Path], sizes: list[tuple[int, int]]
) -> tuple[list[dict[str, Any]], float]:
    """Training images to look at before trusting the threshold: score outliers and tiny images."""
    scores = detector.training_scores()
    which = detector.training_score_images()
    found: dict[Path, dict[str, Any]] = {}
    positions, cutoff = score_outliers(scores)
    for pos in positions:
        path = loaded[int(which[pos])]
        found[path] = {
            "path": str(path),
            "score": float(scores[pos]),
            "reason": f"held-out score {scores[pos]:.4g} is above the outlier cutoff {cutoff:.4g}",
        }
    side = min(detector.input_shape) / TINY_FACTOR
    for path, (h, w) in zip(loaded, sizes):
        if min(h, w) < side:
            item = found.setdefault(path, {"path": str(path), "score": None, "reason": ""})
            tiny = f"{w}x{h} pixels, far smaller than the {_input_text(detector)} model input"
            item["reason"] = f"{item['reason']}; {tiny}" if item["reason"] else tiny
    return list(found.values()), cutoff


def _counting(
    batches: Iterator[Any], failures: list[tuple[Path, str]], bar: Any, loaded: list[Path], sizes: list[tuple[int, int]]
) -> Iterator[torch.Tensor]:
    """Feed loaded images to the detector, collect load failures, loaded paths and sizes, advance the bar."""
    for batch in batches:
        failures.extend(batch.failures)
        loaded.extend(batch.paths)
        sizes.extend(batch.sizes)
        for path, notes in zip(batch.paths, batch.notes):
            for note in notes:
                log.warning("training image %s: %s", path, note)
        bar.update(len(batch.paths) + len(batch.failures))
        if len(batch.paths):
            yield batch.images


def _note_unaligned(batches: Iterator[Any], unaligned: list[str], unrefined: list[str]) -> Iterator[Any]:
    """Pass batches through, recording the paths whose alignment record says ``aligned`` False, and those
    whose ECC refinement kept the first pose (``refined`` False)."""
    for batch in batches:
        for path, record in zip(batch.paths, batch.transforms):
            if record is not None and not record.aligned:
                unaligned.append(str(path))
            if record is not None and record.refined is False:
                unrefined.append(str(path))
        yield batch


def fit_detector(
    detector: Detector,
    paths: Sequence[Path],
    *,
    batch_size: int = 16,
    threshold_quantile: float = DEFAULT_THRESHOLD_QUANTILE,
    progress: bool = False,
    data_name: str | None = None,
    aligner: Any | None = None,
    exclude_outliers: bool = False,
) -> dict[str, Any]:
    """Fit ``detector`` on good images; returns the metadata to save with the model.

    Images that cannot be loaded are skipped and listed; fitting fails before any work when
    there are fewer images than the method needs, and after loading if too few remained.
    ``aligner`` (a :class:`defectscope.components.align.Aligner`) warps each image into its reference
    frame first; images it cannot align are used unaligned and listed in ``training.alignment``.

    After the fit, ``training.suspects`` lists training images to look at before trusting the
    threshold: those whose held-out score is a high outlier (:func:`score_outliers`) and those
    far smaller than the model input (shorter side below the input's shorter side / 4). One defective
    part among the good ones raises the threshold for every later image. ``exclude_outliers`` fits
    once more without them and records them in ``training.excluded``.
    """
    _check_quantile(threshold_quantile)
    detector._validate_params()  # a bad parameter fails now, not after the features are extracted
    need = detector.min_train_images
    if len(paths) < need:
        raise DataLayoutError(
            f"{data_name or 'training data'}: found {len(paths)} image(s), {detector.method} needs at least {need}"
        )
    start = time.perf_counter()
    mean, std = detector.input_stats
    failures: list[tuple[Path, str]] = []
    loaded_paths: list[Path] = []
    sizes: list[tuple[int, int]] = []
    with progress_bar(total=len(paths), desc=f"fit {detector.method}", enabled=progress) as bar:
        batches = iter_batches(
            paths, detector.input_shape, mean, std, batch_size=batch_size, transform=aligner, resize=detector.resize
        )
        unaligned: list[str] = []
        unrefined: list[str] = []
        if aligner is not None:
            batches = _note_unaligned(batches, unaligned, unrefined)
        loaded = len(paths)

        def images() -> Iterator[torch.Tensor]:
            nonlocal loaded
            yield from _counting(batches, failures, bar, loaded_paths, sizes)
            loaded = len(paths) - len(failures)
            if loaded < need:
                raise DataLayoutError(
                    f"{data_name or 'training data'}: only {loaded} of {len(paths)} images could be loaded, "
                    f"{detector.method} needs at least {need}"
                )

        detector.fit(images(), progress=progress)
    fit_seconds = time.perf_counter() - start
    suspects, cutoff = _suspects(detector, loaded_paths, sizes)
    declined = bool(exclude_outliers and suspects and 2 * len(suspects) >= len(loaded_paths))
    if declined:
        log.warning(
            "--exclude-outliers: %d of %d training images are suspect, which is the training set, not "
            "outliers: none excluded (each one's reason is listed with the suspects)",
            len(suspects),
            len(loaded_paths),
        )
    elif exclude_outliers and suspects:
        bad = {Path(s["path"]) for s in suspects}
        log.info("fitting again without %d suspect training image(s)", len(bad))
        meta = fit_detector(
            detector,
            [p for p in paths if Path(p) not in bad],
            batch_size=batch_size,
            threshold_quantile=threshold_quantile,
            progress=progress,
            data_name=data_name,
            aligner=aligner,
        )
        meta["training"]["excluded"] = suspects + meta["training"].get("excluded", [])
        meta["training"]["fit_seconds"] = round(time.perf_counter() - start, 3)  # both fits
        return meta
    threshold = threshold_from_scores(detector.training_scores(), threshold_quantile, detector.training_scores_kind)
    pixel = pixel_threshold_from_maxima(detector.training_map_maxima(), threshold_quantile)
    training: dict[str, Any] = {
        "suspects": suspects,
        **({"exclusion_declined": True} if declined else {}),
        "outlier_rule": (
            f"held-out score > median + {OUTLIER_Z} x MAD / 0.6745 (= {cutoff:.6g}), or shorter side < the input's "
            f"shorter side / {TINY_FACTOR}"
        ),
    }
    if aligner is not None:
        training["alignment"] = {"mode": aligner.mode, "n_unaligned": len(unaligned), "unaligned": unaligned}
        if getattr(aligner, "ecc", False):  # images whose ECC refinement kept the first pose
            training["alignment"] |= {"n_unrefined": len(unrefined), "unrefined": unrefined}
        if unaligned:
            log.warning("%d of %d training images could not be aligned and were used unaligned", len(unaligned), loaded)
    training_summary = {
        "data": data_name,
        "n_images": loaded,
        "skipped": [{"path": str(p), "error": m} for p, m in failures],
        "fit_seconds": round(fit_seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        "details": {**getattr(detector, "fit_details_", {}), **getattr(detector, "fit_timings_", {})},
        **training,
    }
    return {
        "threshold": threshold["threshold"],
        "threshold_info": threshold,
        "threshold_history": [],
        # the fit-time threshold is the first named one; calibrate adds others (defectscope.thresholds)
        "thresholds": {FIT_NAME: fit_entry(threshold, threshold["threshold"], training_summary)},
        "active_threshold": FIT_NAME,
        "pixel_threshold": pixel["threshold"],
        "pixel_threshold_info": pixel,
        "training": training_summary,
    }
