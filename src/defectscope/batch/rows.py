"""The output row: one per image, the same columns in Parquet and CSV, for both engines."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

#: the columns, in order; ``error`` is set for an image that could not be scored (``score`` is then
#: null) and for a scored image whose heatmap could not be written (``score`` is kept)
COLUMNS: tuple[str, ...] = (
    "path",
    "score",
    "judgement",
    "threshold",
    "normalized_score",
    "error",
    "heatmap",
    "model_checksum",
)


def arrow_schema() -> Any:
    """The Parquet schema (pyarrow is imported here, not at module load)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("score", pa.float64()),
            ("judgement", pa.int8()),
            ("threshold", pa.float64()),
            ("normalized_score", pa.float64()),
            ("error", pa.string()),
            ("heatmap", pa.string()),
            ("model_checksum", pa.string()),
        ]
    )


def error_row(path: str, message: str, threshold: float, checksum: str | None) -> dict[str, Any]:
    """The row of an input that gave no image (a missing file, an empty folder, a glob matching nothing)."""
    text = message if message.startswith(path) else f"{path}: {message}"
    return {
        "path": path,
        "score": None,
        "judgement": None,
        "threshold": threshold,
        "normalized_score": None,
        "error": text,
        "heatmap": None,
        "model_checksum": checksum,
    }


def result_row(path: str, result: Any, checksum: str | None, heatmaps: Path | None = None) -> dict[str, Any]:
    """The row of one :class:`defectscope.api.Result`; with ``heatmaps`` the overlay is written there
    (the file name follows from the path alone, so a retried batch rewrites the same file)."""
    row = {
        "path": path,
        "score": result.score,
        "judgement": result.judgement,
        "threshold": result.threshold,
        "normalized_score": result.normalized_score,
        "error": result.error,
        "heatmap": None,
        "model_checksum": checksum,
    }
    if heatmaps is not None and result.ok:
        target = heatmaps / heatmap_file_name(path)
        try:
            _save_png(target, result.overlay(side_by_side=True))
            row["heatmap"] = str(target)
        except Exception as exc:
            row["error"] = f"{path}: heatmap not written: {exc}"
    return row


def heatmap_file_name(path: str) -> str:
    """``<stem>-<10 hex digits of sha1(path)>.png``: readable, unique per path, the same in every run."""
    digest = hashlib.sha1(os.fsencode(path)).hexdigest()[:10]
    return f"{Path(path).stem}-{digest}.png"


def _save_png(target: Path, image: Any) -> None:
    """Write an (H, W, 3) uint8 RGB array as PNG: a temporary file renamed into place."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
