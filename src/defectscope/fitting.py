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

from .data.loader import iter_batches
from .detectors.base import Detector
from .errors import DataLayoutError
from .progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD_QUANTILE = 0.99
#: below this many leave-one-out scores a high quantile is close to the maximum: say so
FEW_THRESHOLD_IMAGES = 50


def threshold_from_scores(
    scores: np.ndarray, quantile: float = DEFAULT_THRESHOLD_QUANTILE, kind: str = "leave-one-image-out"
) -> dict[str, Any]:
    """The decision threshold from held-out scores of good training images (``kind`` says how held out).

    Rule: the ``quantile`` (linear interpolation) of those scores, i.e. the model is expected to
    reject about (1 - quantile) of good parts. Returns the threshold and how it was made,
    including a warning when it rests on too few images to estimate that quantile.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"threshold quantile must be in (0, 1), got {quantile}")
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


def _counting(batches: Iterator[Any], failures: list[tuple[Path, str]], bar: Any) -> Iterator[torch.Tensor]:
    """Feed loaded images to the detector, collect load failures and advance the bar."""
    for batch in batches:
        failures.extend(batch.failures)
        for _, message in batch.failures:
            log.warning("skipping training image %s", message)  # the loader's messages start with the path
        bar.update(len(batch.paths) + len(batch.failures))
        if len(batch.paths):
            yield batch.images


def _note_unaligned(batches: Iterator[Any], unaligned: list[str]) -> Iterator[Any]:
    """Pass batches through, recording the paths whose alignment record says ``aligned`` False."""
    for batch in batches:
        for path, record in zip(batch.paths, batch.transforms):
            if record is not None and not record.aligned:
                unaligned.append(str(path))
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
) -> dict[str, Any]:
    """Fit ``detector`` on good images; returns the metadata to save with the model.

    Images that cannot be loaded are skipped and listed; fitting fails before any work when
    there are fewer images than the method needs, and after loading if too few remained.
    ``aligner`` (a :class:`defectscope.align.Aligner`) warps each image into its reference
    frame first; images it cannot align are used unaligned and listed in ``training.alignment``.
    """
    need = detector.min_train_images
    if len(paths) < need:
        raise DataLayoutError(
            f"{data_name or 'training data'}: found {len(paths)} image(s), {detector.method} needs at least {need}"
        )
    start = time.perf_counter()
    mean, std = detector.input_stats
    failures: list[tuple[Path, str]] = []
    with progress_bar(total=len(paths), desc=f"fit {detector.method}", enabled=progress) as bar:
        batches = iter_batches(paths, detector.image_size, mean, std, batch_size=batch_size, transform=aligner)
        unaligned: list[str] = []
        if aligner is not None:
            batches = _note_unaligned(batches, unaligned)
        loaded = len(paths)

        def images() -> Iterator[torch.Tensor]:
            nonlocal loaded
            yield from _counting(batches, failures, bar)
            loaded = len(paths) - len(failures)
            if loaded < need:
                raise DataLayoutError(
                    f"{data_name or 'training data'}: only {loaded} of {len(paths)} images could be loaded, "
                    f"{detector.method} needs at least {need}"
                )

        detector.fit(images(), progress=progress)
    fit_seconds = time.perf_counter() - start
    threshold = threshold_from_scores(detector.training_scores(), threshold_quantile, detector.training_scores_kind)
    if "warning" in threshold:
        log.info(threshold["warning"])
    training: dict[str, Any] = {}
    if aligner is not None:
        training["alignment"] = {"mode": aligner.mode, "n_unaligned": len(unaligned), "unaligned": unaligned}
        if unaligned:
            log.warning("%d of %d training images could not be aligned and were used unaligned",
                        len(unaligned), loaded)
    return {
        "threshold": threshold["threshold"],
        "threshold_info": threshold,
        "threshold_history": [],
        "training": {
            "data": data_name,
            "n_images": loaded,
            "skipped": [{"path": str(p), "error": m} for p, m in failures],
            "fit_seconds": round(fit_seconds, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(),
            "details": {**getattr(detector, "fit_details_", {}), **getattr(detector, "fit_timings_", {})},
            **training,
        },
    }
