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
from .data.geometry import placement, size_text
from .data.loader import iter_batches
from .detectors.base import Detector
from .errors import DataLayoutError, DefectscopeError
from .judging import JudgeRule
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


#: held-out maps made at a time while a judge rule's threshold is set (each 288 x 288 map is 0.3 MB)
_MAP_CHUNK = 32


def judge_threshold(
    detector: Detector, rule: JudgeRule, sizes: Sequence[tuple[int, int]], quantile: float
) -> tuple[JudgeRule, dict[str, Any]]:
    """The threshold of a judge rule (:mod:`defectscope.judging`) from held-out good training images.

    Each training image scored for the image threshold is scored again by the rule on its held-out
    anomaly map (:meth:`Detector.training_maps`: computed as if the image had not been in the
    training set), over its photo frame (``sizes``: (H, W) of every training image in fit order); the
    threshold is the same quantile of those scores (:func:`threshold_from_scores`), so the rule's
    false-reject rate on good parts is estimated as honestly as the max rule's. For "integrated" the
    map level is set first: the rule's ``level_quantile`` of the held-out maps' maxima.
    Returns the rule (with its level) and the threshold info.
    """
    which = detector.training_score_images()
    frames = [placement(sizes[int(i)], detector.input_shape, detector.resize) for i in which]

    def photo_maps() -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        for start in range(0, len(which), _MAP_CHUNK):
            maps = detector.training_maps(start, start + _MAP_CHUNK)
            for k, amap in enumerate(maps):
                yield frames[start + k].to_photo_frame(amap), sizes[int(which[start + k])]

    if rule.rule == "integrated":
        assert rule.level_quantile is not None
        maxima = np.array([float(amap.max()) for amap, _ in photo_maps()])
        rule = rule.with_level(float(np.quantile(maxima, rule.level_quantile)))
    scores = np.array([rule.score(amap, size) for amap, size in photo_maps()])
    info = threshold_from_scores(scores, quantile, f"{detector.training_scores_kind}; {rule.describe()}")
    return rule, info


def check_judge(detector: Detector, rule: JudgeRule, paths: Sequence[Path]) -> None:
    """Refuse, before any work, a judge rule the method cannot set a threshold for, or a minimum region
    larger than the first training photo."""
    if type(detector)._training_maps is Detector._training_maps:
        raise DefectscopeError(
            f"judging by {rule.rule} needs held-out anomaly maps of the training images, which {detector.method} "
            "does not give: fit with method patchcore, or judge by max"
        )
    if rule.rule != "region" or not paths:
        return
    from PIL import Image

    try:
        with Image.open(paths[0]) as image:
            w, h = image.size
    except (OSError, ValueError):  # an unreadable file is reported by the loader, with the others
        return
    whole = rule.pixel_area((h, w), (1, 1))  # the photo as one "map pixel": its whole area
    if rule.min_region > whole:
        unit = "mm^2" if rule.pixel_size is not None else "pixels"
        raise DefectscopeError(
            f"the smallest region that rejects a part ({rule.min_region:g} {unit}) is larger than the training "
            f"image {paths[0]} ({w}x{h} pixels = {whole:g} {unit}): give a smaller minimum region"
            + (" or check the pixel size (mm per pixel)" if rule.pixel_size is not None else "")
        )


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
    judge: JudgeRule | None = None,
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

    ``judge`` (:class:`defectscope.judging.JudgeRule`; None: the detector's score, "max") judges images by
    the regions of their anomaly maps: the threshold is then the rule's (:func:`judge_threshold`) and
    the metadata's ``judge`` records the rule; ``score_threshold`` keeps the max rule's threshold.
    """
    _check_quantile(threshold_quantile)
    detector._validate_params()  # a bad parameter fails now, not after the features are extracted
    if judge is not None:
        check_judge(detector, judge, paths)
        if judge.level_quantile is not None and judge.level_quantile >= threshold_quantile:
            raise DefectscopeError(
                f"level_quantile {judge.level_quantile:g} must be below the threshold quantile {threshold_quantile:g}: "
                f"above the level, only about {1 - judge.level_quantile:.1%} of good images have a region at all, "
                "so the threshold would be 0 and every image judged defective; give a lower level quantile"
            )
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
            judge=judge,
        )
        meta["training"]["excluded"] = suspects + meta["training"].get("excluded", [])
        meta["training"]["fit_seconds"] = round(time.perf_counter() - start, 3)  # both fits
        return meta
    threshold = threshold_from_scores(detector.training_scores(), threshold_quantile, detector.training_scores_kind)
    pixel = pixel_threshold_from_maxima(detector.training_map_maxima(), threshold_quantile)
    judged: dict[str, Any] = {}
    if judge is not None:
        judge, rule_threshold = judge_threshold(detector, judge, sizes, threshold_quantile)
        judged = {"judge": judge.to_meta(), "score_threshold": threshold["threshold"]}
        threshold = rule_threshold
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
        **judged,
        "training": training_summary,
    }
