"""Batch scoring of image archives: ``defectscope batch MODEL INPUT... -o OUT``.

One row per image (path, score, judgement, threshold, normalized score, error, heatmap, model
checksum) streamed to Parquet parts or a CSV file, resumable by path. Two engines run the same
scoring through :mod:`defectscope.api`: ``local`` (this process, as ``predict``) and ``ray`` (a
Ray Data pipeline over an actor pool, one model load per actor). Nothing heavy is imported here:
pyarrow and ray load when a run needs them.

    inputs.py      INPUT arguments (files, folders, globs, list files) -> image paths
    rows.py        the row schema and a Result -> row
    sinks.py       Parquet parts + manifest, or CSV: streamed, atomic, resumable
    local.py       the local engine
    ray_engine.py  the Ray engine
    run.py         checks before the work, resume, engine, sink: :func:`run_batch`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BatchSummary", "run_batch"]

if TYPE_CHECKING:
    from .run import BatchSummary, run_batch


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'defectscope.batch' has no attribute {name!r}")
