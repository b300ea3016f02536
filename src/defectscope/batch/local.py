"""The local engine: this process scores the paths with :meth:`Model.iter_predict`, as ``predict`` does."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from .rows import result_row


def score_local(
    model: Any,
    paths: list[str],
    *,
    threshold: float,
    batch_size: int = 16,
    heatmaps: Path | None = None,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """One row per path, in order, each as soon as its batch is scored.

    The paths go to the model in stretches of a multiple of ``batch_size``, so the batches are
    those ``predict`` forms over the same list (scores do not depend on batching anyway)."""
    from ..common.progress import progress_bar

    checksum = model.checksum
    stretch = batch_size * 16
    it = iter(paths)
    with progress_bar(total=len(paths), desc="batch", enabled=progress) as bar:
        while chunk := list(islice(it, stretch)):
            results = model.iter_predict(chunk, maps=heatmaps is not None, threshold=threshold, batch_size=batch_size)
            for path, result in zip(chunk, results):
                bar.update(1)
                yield result_row(path, result, checksum, heatmaps)
