"""Benchmark methods over every category of a dataset: fit, evaluate, tabulate, resume.

Each (method, category) *cell* is fitted on the category's good training images (threshold
from leave-one-out scores, as ``defectscope fit``) and evaluated on its test images (as
``defectscope evaluate``). A finished cell is written at once, atomically, to
``OUT/cells/<method>-<category>-<key>.json``; ``key`` hashes the method, its full parameters
(backbone included) and the category's data path, so a rerun skips exactly the cells whose
settings did not change. Failed cells are reported but not stored, so a rerun retries them.

Outputs in ``OUT``: ``benchmark.md`` (also returned for printing), ``benchmark.csv``,
``benchmark.json``, ``index.html`` linking ``<method>/index.html`` tables (and, with
``report=True``, one HTML report per cell under ``<method>/<category>/``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common.files import replacing
from .common.jsonout import dumps
from .data.datasets import Category, discover
from .detectors import comparable_params, detector_class, make_detector
from .errors import DataLayoutError, DefectscopeError
from .evaluation.operating import FALSE_REJECT_RATES, flat_summary, rate_key

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("benchmark-results")
METRICS: tuple[tuple[str, str, int], ...] = (
    ("image_auroc", "image AUROC", 4),
    ("pixel_auroc", "pixel AUROC", 4),
    ("aupro", "AUPRO", 4),
    *((rate_key(r), f"catch @{100 * r:g} % FR", 3) for r in FALSE_REJECT_RATES),
    ("fit_seconds", "fit s", 1),
    ("images_per_second", "images/s", 2),
)
"""(cell key, column title, decimals) of the tables, in order. ``catch @1 % FR``: the catch rate
(share of defective test images judged defective) at the lowest threshold that rejects at most 1 %
of the good test images (:mod:`defectscope.evaluation.operating`)."""
#: columns the CSV carries beyond the tables: the two rates at the model's threshold
AT_THRESHOLD = ("catch_at_threshold", "false_reject_at_threshold")

Notify = Callable[[str], None]


# --------------------------------------------------------------------------- cells
def method_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that ``method`` takes (options of other methods are dropped)."""
    valid = set(detector_class(method)._param_names())
    return {k: v for k, v in params.items() if k in valid}


def cell_key(method: str, full_params: dict[str, Any], data_path: Path) -> str:
    """12 hex digits identifying a cell's settings: method, all parameters (as
    :func:`~defectscope.detectors.comparable_params` gives them: parameters added later are left out
    while at the value that computes as before), the category's data."""
    blob = json.dumps(
        {"method": method, "params": comparable_params(full_params), "data": str(Path(data_path).resolve())},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _equivalent_cell(
    cells_dir: Path, stem_prefix: str, method: str, full_params: dict[str, Any], data_path: Path
) -> tuple[Path, dict[str, Any]] | None:
    """A finished cell stored under another key (by an earlier version, which keyed on every parameter it
    had) whose settings compute the same: same method and data, equal comparable parameters."""
    want = comparable_params(full_params)
    data = str(Path(data_path).resolve())
    for path in sorted(cells_dir.glob(f"{stem_prefix}-*.json")):
        cell = _read_cell(path)
        if (
            cell is not None
            and cell.get("method") == method
            and isinstance(cell.get("params"), dict)
            and str(Path(str(cell.get("data", ""))).resolve()) == data
            and comparable_params(cell["params"]) == want
        ):
            return path, cell
    return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (never a half file)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _read_cell(path: Path) -> dict[str, Any] | None:
    """A stored finished cell, or None when absent or unreadable (then it is recomputed)."""
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cell if isinstance(cell, dict) and cell.get("status") == "ok" else None


def run_cell(
    method: str,
    params: dict[str, Any],
    category: Category,
    out_dir: Path,
    *,
    batch_size: int = 16,
    threshold_quantile: float = 0.99,
    progress: bool = False,
    report: bool = False,
    model_path: Path | None = None,
) -> dict[str, Any]:
    """Fit ``method`` on the category's train images and evaluate it; returns the cell record."""
    from .api import fit

    split = category.load()
    if not split.train:
        raise DataLayoutError(f"{category.path}: no good training images (a plain folder needs train/)")
    model = fit(
        split.train,
        method=method,
        batch_size=batch_size,
        threshold_quantile=threshold_quantile,
        progress=progress,
        data_name=str(category.path),
        **params,
    )
    detector, meta = model.detector, model.meta
    report_dir = out_dir / _safe(method) / _safe(category.name) if report else None
    result = model.evaluate(
        split,
        batch_size=batch_size,
        progress=progress,
        overlay_dir=report_dir / "overlays" if report_dir is not None else None,
    )
    record: dict[str, Any] = {
        "status": "ok",
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "image_f1_max": result["image_f1_max"],
        **flat_summary(result.get("operating_points")),
        "operating_points": result.get("operating_points"),
        "fit_seconds": meta["training"]["fit_seconds"],
        "images_per_second": result["images_per_second"],
        "n_train": meta["training"]["n_images"],
        "n_good": result["n_good"],
        "n_defective": result["n_defective"],
        "n_failed": result["n_failed"] + len(meta["training"]["skipped"]),
        "layers": list(detector.layers or []),
        "threshold": meta["threshold"],
    }
    if report_dir is not None:
        from .report.html import write_report

        result["data"] = str(category.path)
        write_report(result, report_dir, meta=meta)
        record["report"] = os.path.relpath(report_dir, out_dir)
    if model_path is not None:
        model.save(model_path)
        record["model"] = os.path.relpath(model_path, out_dir)
    return record


def run_benchmark(
    data: str | Path,
    methods: Sequence[str],
    *,
    categories: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
    out_dir: str | Path = DEFAULT_OUT,
    batch_size: int = 16,
    threshold_quantile: float = 0.99,
    force: bool = False,
    report: bool = False,
    save_models: bool = False,
    progress: bool = False,
    notify: Notify | None = None,
) -> list[dict[str, Any]]:
    """Run every (method, category) cell, reusing stored ones unless ``force``; returns all cells.

    ``params`` are detector parameters shared by the methods; each method gets the ones it takes,
    and a parameter no chosen method takes is an error. A cell that fails gets ``status`` "error"
    and ``error`` (one line); the others still run. Tables are written to ``out_dir`` at the end.
    """
    say = notify or log.info
    out_dir = Path(out_dir)
    params = dict(params or {})
    methods = list(dict.fromkeys(methods))
    for method in methods:
        detector_class(method)  # unknown method -> error before any work
    unused = [p for p in params if not any(p in detector_class(m)._param_names() for m in methods)]
    if unused:
        raise DefectscopeError(f"parameter(s) {', '.join(unused)} are not taken by {', '.join(methods)}")
    found = discover(data, categories)
    cells: list[dict[str, Any]] = []
    for method in methods:
        mp = method_params(method, params)
        full = make_detector(method, **mp).get_params()
        for category in found:
            key = cell_key(method, full, category.path)
            stem = f"{_safe(method)}-{_safe(category.name)}-{key}"
            cell_path = out_dir / "cells" / f"{stem}.json"
            base = {
                "method": method,
                "category": category.name,
                "layout": category.layout,
                "data": str(category.path),
                "backbone": full["backbone"],
                "params": full,
                "key": key,
            }
            stored = None if force else _read_cell(cell_path)
            found_at = cell_path
            if stored is None and not force:
                equivalent = _equivalent_cell(
                    cell_path.parent, f"{_safe(method)}-{_safe(category.name)}", method, full, category.path
                )
                if equivalent is not None:
                    found_at, stored = equivalent
            if stored is not None:
                say(f"{method} / {category.name}: done before, skipped ({found_at}; --force recomputes)")
                cells.append(stored)
                continue
            say(f"{method} / {category.name}: fitting and evaluating")
            start = time.perf_counter()
            try:
                record = run_cell(
                    method,
                    mp,
                    category,
                    out_dir,
                    batch_size=batch_size,
                    threshold_quantile=threshold_quantile,
                    progress=progress,
                    report=report,
                    model_path=out_dir / "models" / f"{stem}.dsmodel" if save_models else None,
                )
            except (DefectscopeError, OSError, ValueError, RuntimeError) as exc:
                message = " ".join(str(exc).split()) or type(exc).__name__
                log.debug("cell %s failed:\n%s", stem, traceback.format_exc())
                say(f"{method} / {category.name}: error: {message}")
                cells.append({**base, "status": "error", "error": message})
                continue
            cell = {**base, **record, "seconds": round(time.perf_counter() - start, 3)}
            _atomic_write_text(cell_path, dumps(cell, indent=2, default=str))
            say(
                f"{method} / {category.name}: image AUROC {_fmt(cell['image_auroc'], 4)}, "
                f"pixel AUROC {_fmt(cell['pixel_auroc'], 4)} ({cell['seconds']:.1f} s)"
            )
            cells.append(cell)
    write_outputs(cells, out_dir, data=str(data))
    return cells


# --------------------------------------------------------------------------- tables
def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "n/a"


def method_means(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the finished cells that have it; counts of ok / all cells, and in
    ``n_with`` (metric -> count) how many cells each mean is over (cells stored before a metric was
    recorded lack it)."""
    ok = [c for c in cells if c.get("status") == "ok"]
    means: dict[str, Any] = {"n_ok": len(ok), "n_categories": len(cells)}
    for key in (*(k for k, _, _ in METRICS), *AT_THRESHOLD):
        values = [float(c[key]) for c in ok if isinstance(c.get(key), (int, float)) and math.isfinite(c[key])]
        means[key] = sum(values) / len(values) if values else None
        means.setdefault("n_with", {})[key] = len(values)
    return means


def _by_method(cells: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(cell["method"], []).append(cell)
    return groups


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown(cells: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per method: a row per category and the mean over categories."""
    parts: list[str] = []
    header = "| category | " + " | ".join(title for _, title, _ in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    for method, group in _by_method(cells).items():
        first = group[0]
        layers = next((c.get("layers") for c in group if c.get("layers")), None)
        parts.append(
            f"### {method} ({first.get('backbone')}"
            + (f", {','.join(layers)}" if layers else "")
            + f", image size {first.get('params', {}).get('image_size')}"
            + (
                f", layer weighting {first['params']['layer_weighting']}"
                if "layer_weighting" in first.get("params", {})
                else ""
            )
            + ")"
        )
        parts.append("")
        parts += [header, rule]
        for c in group:
            if c.get("status") == "ok":
                cols = [_fmt(c.get(key), digits) for key, _, digits in METRICS]
            else:
                cols = [f"error: {_md_escape(c.get('error', ''))}"] + [""] * (len(METRICS) - 1)
            parts.append(f"| {_md_escape(c['category'])} | " + " | ".join(cols) + " |")
        m = method_means(group)
        label = "**mean**" if m["n_ok"] == m["n_categories"] else f"**mean ({m['n_ok']} of {m['n_categories']})**"
        parts.append(f"| {label} | " + " | ".join(_mean_cell(m, key, d) for key, _, d in METRICS) + " |")
        parts.append("")
    if parts:
        parts.append(
            "catch @x % FR: the share of defective test images caught at the lowest threshold that rejects at most "
            "x % of the good test images (FR: false-reject rate); n/a for cells stored before it was recorded."
        )
    return "\n".join(parts).rstrip() + "\n"


def _mean_cell(means: dict[str, Any], key: str, digits: int) -> str:
    """A mean in bold, with ``(k of n)`` when only k of the n finished cells have the metric."""
    text = f"**{_fmt(means[key], digits)}**"
    k = means["n_with"][key]
    return text if k in (0, means["n_ok"]) else f"{text} ({k} of {means['n_ok']})"


def write_outputs(cells: Sequence[dict[str, Any]], out_dir: Path, *, data: str | None = None) -> dict[str, Path]:
    """Write benchmark.md, benchmark.csv, benchmark.json and the HTML index pages; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "benchmark.md",
        "csv": out_dir / "benchmark.csv",
        "json": out_dir / "benchmark.json",
        "html": out_dir / "index.html",
    }
    _atomic_write_text(paths["markdown"], format_markdown(cells))

    columns = [
        "method",
        "category",
        "status",
        "backbone",
        *(k for k, _, _ in METRICS),
        *AT_THRESHOLD,
        "image_f1_max",
        "n_train",
        "n_good",
        "n_defective",
        "n_failed",
        "error",
        "key",
    ]
    lines: list[list[Any]] = []
    for method, group in _by_method(cells).items():
        lines += [[c.get(col, "") if c.get(col) is not None else "" for col in columns] for c in group]
        m = method_means(group)
        lines.append(
            [
                method,
                "mean",
                f"{m['n_ok']}/{m['n_categories']} ok",
                group[0].get("backbone"),
                *(m[k] if m[k] is not None else "" for k, _, _ in METRICS),
                *(m[k] if m[k] is not None else "" for k in AT_THRESHOLD),
            ]
            + [""] * 7
        )
    with open(paths["csv"], "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(lines)

    summary = {
        "data": data,
        "cells": list(cells),
        "means": {method: method_means(group) for method, group in _by_method(cells).items()},
    }
    _atomic_write_text(paths["json"], dumps(summary, indent=2, default=str))
    _write_html(cells, out_dir)
    return paths


def _write_html(cells: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """``<method>/index.html`` per method (write_benchmark_index) and a top ``index.html`` linking them."""
    from .report.html import render_benchmark_summary, write_benchmark_index

    methods = []
    for method, group in _by_method(cells).items():
        rows = []
        for c in group:
            row = {**c, "dataset": c["category"] if c.get("status") == "ok" else f"{c['category']} (error)"}
            if c.get("report"):
                row["report"] = out_dir / c["report"]
            rows.append(row)
        page = write_benchmark_index(rows, out_dir / _safe(method))
        m = method_means(group)
        methods.append(
            {
                "name": method,
                "href": os.path.relpath(page, out_dir).replace(os.sep, "/"),
                "image_auroc": m["image_auroc"],
                "pixel_auroc": m["pixel_auroc"],
                "n_ok": m["n_ok"],
                "n_categories": m["n_categories"],
            }
        )
    _atomic_write_text(out_dir / "index.html", render_benchmark_summary(methods))
