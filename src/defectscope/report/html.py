"""Self-contained HTML reports: ``index.html`` plus PNGs in the same folder, relative links only.

The pages render from the Jinja2 templates in ``templates/`` (autoescaped: every value from a
result, a path or a defect type is escaped). The page embeds no network resource (no web fonts,
scripts or stylesheets from elsewhere), so it renders from ``file://`` and can be zipped or copied
as a folder.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2

from . import figures

log = logging.getLogger(__name__)

GALLERY_SIZE = 8
"""Images shown in each of the worst-false-positive and worst-false-negative galleries."""


def _num(value: Any, digits: int = 4) -> str:
    """A number as the report shows it: floats to ``digits`` places, missing or non-finite as n/a."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any, digits: int = 1) -> str:
    """A rate (a fraction) as a percentage: 0.8412 -> ``84.1 %``; missing as n/a."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value) * 100:.{digits}f} %"


def _rate_name(value: float) -> str:
    """A named rate as a percentage without trailing zeros: 0.005 -> ``0.5 %``, 0.01 -> ``1 %``."""
    return f"{float(value) * 100:.2f}".rstrip("0").rstrip(".") + " %"


def _url(*parts: str | Path) -> str:
    """A relative URL for a path inside the report folder (joined from ``parts``)."""
    return quote(Path(*parts).as_posix())


@functools.cache
def _environment() -> jinja2.Environment:
    """The report's own template environment (its templates only; built on first use, not at import)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("defectscope.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, pct=_pct, rate_name=_rate_name, url=_url, basename=lambda path: Path(path).name)
    return env


def render(template: str, **context: Any) -> str:
    """Render one of the report's templates (``report.html``, ``benchmark_index.html``, ...)."""
    return _environment().get_template(template).render(**context)


# ----------------------------------------------------------------------------- figures


def make_figures(result: dict[str, Any], folder: Path) -> dict[str, str]:
    """Draw every figure the result has data for into ``folder``; returns name -> file name.

    ``tradeoff`` (catch rate against false-reject rate, :func:`figures.tradeoff_figure`) needs the
    image ROC curve and the result's ``operating_points``."""
    made: dict[str, str] = {}
    curves = result.get("curves") or {}
    roc = curves.get("image_roc")
    if roc:
        fig = figures.roc_figure(
            [("image", roc["fpr"], roc["tpr"], result.get("image_auroc"))], title="Image-level ROC"
        )
        figures.save_figure(fig, folder / "roc_image.png")
        made["roc_image"] = "roc_image.png"
    proc = curves.get("pixel_roc")
    if proc:
        fig = figures.roc_figure(
            [("pixel", proc["fpr"], proc["tpr"], result.get("pixel_auroc"))], title="Pixel-level ROC"
        )
        figures.save_figure(fig, folder / "roc_pixel.png")
        made["roc_pixel"] = "roc_pixel.png"
    pro = curves.get("pro")
    if pro:
        fig = figures.pro_figure(pro["fpr"], pro["pro"], result.get("aupro"), result.get("aupro_fpr_limit", 0.3))
        figures.save_figure(fig, folder / "pro.png")
        made["pro"] = "pro.png"
    op = result.get("operating_points")
    if roc and op:
        at = op.get("at_threshold")
        model = None
        if at and at["false_reject"]["rate"] is not None and at["catch"]["rate"] is not None:
            model = (at["false_reject"]["rate"], at["catch"]["rate"])
        fig = figures.tradeoff_figure(
            roc["fpr"],
            roc["tpr"],
            points=[
                (row["false_reject"]["rate"], row["catch"]["rate"], tuple(row["catch"]["ci"]))
                for row in op["at_false_reject"]
                if row["catch"]["rate"] is not None
            ],
            model=model,
            resolution=op.get("resolution"),
        )
        figures.save_figure(fig, folder / "tradeoff.png")
        made["tradeoff"] = "tradeoff.png"
    images = result.get("images") or []
    if images:
        good = [r["score"] for r in images if r["label"] == 0]
        bad = [r["score"] for r in images if r["label"] == 1]
        figures.save_figure(
            figures.score_histogram_figure(good, bad, float(result["threshold"])), folder / "scores.png"
        )
        made["scores"] = "scores.png"
    if result.get("confusion"):
        figures.save_figure(figures.confusion_figure(result["confusion"]), folder / "confusion.png")
        made["confusion"] = "confusion.png"
    return made


# ----------------------------------------------------------------------------- pages

_FIGURE_ALTS = {
    "roc_image": "image ROC curve",
    "roc_pixel": "pixel ROC curve",
    "pro": "PRO curve",
    "scores": "histogram of scores of good and defective images",
    "confusion": "confusion matrix",
}


def _input_text(result: dict[str, Any], meta: dict[str, Any]) -> str:
    """The model input and how photos were resized to it: ``320x256 (keep-aspect)``."""
    from ..data.geometry import size_text
    from ..errors import DefectscopeError

    size = result.get("image_size", meta.get("image_size"))
    if size is None:
        return "n/a"
    try:
        text = size_text(size)
    except DefectscopeError:
        text = str(size)
    return f"{text} ({result.get('resize', meta.get('resize', 'stretch'))})"


def write_report(
    result: dict[str, Any], out_dir: Path, *, meta: dict[str, Any] | None = None, overlays: str = "overlays"
) -> Path:
    """Write ``out_dir/index.html`` and its figures for one evaluation ``result``; returns the page.

    ``result`` is what :func:`defectscope.evaluation.evaluate.evaluate_detector` returns; image records
    with an ``"overlay"`` key point into ``out_dir/overlays`` (the ``overlay_dir`` given there).
    ``meta`` is the model's metadata (training data, threshold rule and its warning).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = make_figures(result, out_dir / "figures")
    images = result.get("images") or []
    with_overlay = [r for r in images if r.get("overlay")]
    groups = [
        (name, sorted((r for r in with_overlay if r["defect_type"] == name), key=lambda r: -r["score"]))
        for name in dict.fromkeys(r["defect_type"] for r in with_overlay)
    ]
    page = out_dir / "index.html"
    page.write_text(
        render(
            "report.html",
            title=f"defectscope report: {result.get('dataset')} ({result.get('method')})",
            result=result,
            meta=meta or {},
            figures=[(_url("figures", made[key]), alt) for key, alt in _FIGURE_ALTS.items() if key in made],
            tradeoff=_url("figures", made["tradeoff"]) if "tradeoff" in made else None,
            op=result.get("operating_points"),
            overlays=overlays,
            worst_good=sorted((r for r in images if r["label"] == 0), key=lambda r: -r["score"])[:GALLERY_SIZE],
            worst_bad=sorted((r for r in images if r["label"] == 1), key=lambda r: r["score"])[:GALLERY_SIZE],
            n_fp=sum(1 for r in images if r["label"] == 0 and r["judgement"] == 1),
            n_fn=sum(1 for r in images if r["label"] == 1 and r["judgement"] == 0),
            groups=groups,
            input_text=_input_text(result, meta or {}),
        ),
        encoding="utf-8",
    )
    log.info("wrote report %s", page)
    return page


_BENCH_COLUMNS = [
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1_max", "image F1-max"),
    ("catch_at_fr_1pct", "catch @1 % false-reject rate"),
    ("images_per_second", "images/s"),
]


def write_benchmark_index(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """Write ``out_dir/index.html``: one table row per category result, linking its report, plus the mean.

    Each row is a result dict (``dataset``, ``method``, ``backbone`` and the metrics of
    :func:`evaluate_detector`) with an optional ``report``: the category's report folder or
    page (absolute or relative to ``out_dir``). Missing metrics show as n/a and are left out
    of the mean.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = []
    for row in rows:
        href = None
        if row.get("report"):
            target = Path(row["report"])
            target = target if target.is_absolute() else out_dir / target
            if target.suffix.lower() != ".html":
                target = target / "index.html"
            href = _url(os.path.relpath(target, out_dir))
        table.append(
            {
                "name": row.get("dataset", "?"),
                "href": href,
                "method": row.get("method", ""),
                "backbone": row.get("backbone", ""),
                "metrics": [row.get(key) for key, _ in _BENCH_COLUMNS],
            }
        )
    means = []
    for key, _ in _BENCH_COLUMNS:
        values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        means.append(sum(values) / len(values) if values else None)
    page = out_dir / "index.html"
    page.write_text(
        render(
            "benchmark_index.html",
            title="defectscope benchmark",
            columns=[label for _, label in _BENCH_COLUMNS],
            rows=table,
            means=means if rows else [],
        ),
        encoding="utf-8",
    )
    return page


def render_benchmark_summary(methods: list[dict[str, Any]]) -> str:
    """The benchmark's top ``index.html``: one line per method linking its table, and the table files.

    Each entry has ``name``, ``href`` (the method's page, relative to the top page), the mean
    ``image_auroc`` and ``pixel_auroc`` (None when no cell has one), ``n_ok`` and ``n_categories``.
    """
    return render("benchmark_summary.html", title="defectscope benchmark", methods=methods)
