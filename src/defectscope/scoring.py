"""Score image files with a fitted detector, in input order, never losing a result to a bad file."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .common.progress import progress_bar
from .data.loader import ArrayImage, Source, iter_batches
from .errors import DefectscopeError

if TYPE_CHECKING:  # not imported: an exported model (defectscope.export) scores without torch
    from .detectors.base import Detector
    from .judging import JudgeRule

log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """The outcome for one image file.

    score/judgement are None and ``error`` holds a one-line message when the image could not
    be scored. ``map`` (when requested) is the (h, w) anomaly map over the whole photo: the model's map
    taken back through the resize protocol (:meth:`defectscope.data.geometry.Placement.to_photo_frame`),
    at about the model's resolution; resize it to the photo's (H, W) to lay it on the photo.
    ``notes``: what of the file was not used as it is (extra frames, transparency), one phrase each.
    ``size``: the image's (H, W) as read (after EXIF orientation).
    ``regions`` (only for a model judged by region, :mod:`defectscope.judging`): what the judgement rests on,
    see :meth:`defectscope.judging.JudgeRule.regions`.
    ``alignment`` (only when scored with an aligner): {"aligned", "inliers", "angle"}; an
    image that could not be aligned was scored as given and has ``aligned`` False.
    ``roi`` (with ``map``, for a model with a region of interest): the region over the whole photo, on
    ``map``'s grid, bool; the map is 0 outside it.
    """

    path: Source
    score: float | None = None
    judgement: int | None = None
    error: str | None = None
    map: np.ndarray | None = None
    alignment: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    regions: dict[str, Any] | None = None
    roi: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def pixel_threshold(meta: dict[str, Any]) -> float:
    """The model's pixel threshold (overlays are drawn against it). Models fitted before it existed
    fall back to the image threshold, with a warning: their overlays may then mislead (SPADE's map
    is on another scale than its score)."""
    value = meta.get("pixel_threshold")
    if value is None:
        log.warning(
            "this model has no pixel threshold (fitted by an older defectscope): overlays are drawn against "
            "the image threshold; refit it for overlays that agree with the verdict"
        )
        return float(meta["threshold"])
    return float(value)


def normalized_score(score: float | None, threshold: float) -> float | None:
    """score / threshold, so that 1.0 is the decision boundary; None when undefined (threshold <= 0)."""
    if score is None or not threshold > 0 or not np.isfinite(threshold):
        return None
    return float(score) / float(threshold)


def judge(score: float, threshold: float) -> int:
    """1 (defective) when the score is at or above the threshold, else 0 (good).

    The same rule as :func:`defectscope.evaluation.metrics.confusion_at` and :func:`defectscope.evaluation.metrics.f1_max`.
    """
    return int(score >= threshold)


def score_paths(
    detector: Detector,
    paths: Sequence[Source],
    threshold: float,
    *,
    batch_size: int = 16,
    keep_maps: bool = False,
    progress: bool = False,
    aligner: Any | None = None,
    rule: JudgeRule | None = None,
) -> Iterator[ImageResult]:
    """Yield one :class:`ImageResult` per path, in the order given.

    Images are decoded in a background thread while the model runs; an image that fails to
    load yields a result with ``error`` set and the others are scored as usual.

    With an ``aligner`` (:class:`defectscope.components.align.Aligner`) each image is warped into the
    reference frame before scoring and its map is warped back: ``map`` is then the map over the
    original image, not over the warped one.

    With a judge ``rule`` (:class:`defectscope.judging.JudgeRule`; None: the detector's score) each image's
    score is the rule's, computed on its map over the photo (before it is warped back), and ``regions``
    says what it rests on at ``threshold``.
    A region of interest (the detector's ``roi_mask()``) is taken back over each photo the same way
    (``roi``).
    """
    paths = [p if isinstance(p, ArrayImage) else Path(p) for p in paths]
    start = 0
    mean, std = detector.input_stats
    region = getattr(detector, "roi_mask", lambda: None)() if keep_maps else None
    region = None if region is None else region.astype(np.float32)
    with progress_bar(total=len(paths), desc=f"predict {detector.method}", enabled=progress) as bar:
        for batch in iter_batches(
            paths,
            detector.input_shape,
            mean,
            std,
            batch_size=batch_size,
            transform=aligner,
            resize=detector.resize,
            prepare=getattr(detector, "prepare", None),
        ):
            chunk = paths[start : start + batch_size]  # each batch is the next stretch of paths, in order
            start += len(chunk)
            scored: list[ImageResult] = []
            if len(batch.paths):
                pred = detector.predict(batch.images)
                for j, path in enumerate(batch.paths):
                    record = batch.transforms[j] if batch.transforms else None
                    amap = batch.placements[j].to_photo_frame(pred.maps[j]) if keep_maps or rule else None
                    regions = None
                    if rule is None:
                        score = float(pred.scores[j])
                    else:
                        assert amap is not None
                        try:
                            score = rule.score(amap, batch.sizes[j])
                            regions = rule.regions(amap, batch.sizes[j], threshold)
                        except DefectscopeError as exc:  # a map the rule cannot read: this image only
                            scored.append(ImageResult(path, error=f"{path}: {exc}"))
                            continue
                    if not keep_maps:
                        amap = None
                    if amap is not None and record is not None:
                        amap = aligner.map_to_original(amap, record)
                    roi = None
                    if region is not None:  # the unseen border of a crop is not judged: outside
                        roi = batch.placements[j].to_photo_frame(region, fill=0.0)
                        if record is not None and aligner is not None:
                            roi = aligner.map_to_original(roi, record)
                        roi = roi >= 0.5
                    scored.append(
                        ImageResult(
                            path,
                            score=score,
                            judgement=judge(score, threshold),
                            map=amap,
                            alignment=record.as_dict() if record is not None else None,
                            notes=batch.notes[j] if batch.notes else [],
                            size=batch.sizes[j],
                            regions=regions,
                            roi=roi,
                        )
                    )
            bar.update(len(batch.paths) + len(batch.failures))
            # loaded and failed files each keep input order: merge them back by walking the stretch
            loaded, failed = iter(scored), iter(batch.failures)
            next_loaded = next(loaded, None)
            for path in chunk:
                if next_loaded is not None and next_loaded.path == path:
                    yield next_loaded
                    next_loaded = next(loaded, None)
                else:
                    failed_path, message = next(failed)
                    yield ImageResult(failed_path, error=message)
