"""Self-contained HTML reports: ``index.html`` plus PNGs in the same folder, relative links only.

The page embeds no network resource (no web fonts, scripts or stylesheets from elsewhere), so it
renders from ``file://`` and can be zipped or copied as a folder.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import figures

log = logging.getLogger(__name__)

GALLERY_SIZE = 8
"""Images shown in each of the worst-false-positive and worst-false-negative galleries."""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;max-width:1400px}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:16px}.figs img{max-width:100%;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:180px;font-size:12px}
.card img{width:180px;height:auto;display:block;border:3px solid #ccc}
.card.wrong img{border-color:#e34a33}.card.right img{border-color:#31a354}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:6px 10px;margin:8px 0}
.muted{color:#666}code{background:#f5f5f5;padding:0 3px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _url(relative: str | Path) -> str:
    """A relative URL for a path inside the report folder."""
    return quote(Path(relative).as_posix())


def _page(title: str, body: list[str]) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<link rel="icon" href="data:,">',  # no favicon request (a 404 would be a console error)
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
            *body,
            "</body></html>",
        ]
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(row, numeric))
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(pairs: Sequence[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"


# ----------------------------------------------------------------------------- figures


def make_figures(result: dict[str, Any], folder: Path) -> dict[str, str]:
    """Draw every figure the result has data for into ``folder``; returns name -> file name."""
    made: dict[str, str] = {}
    curves = result.get("curves") or {}
    roc = curves.get("image_roc")
    if roc:
        fig = figures.roc_figure([("image", roc["fpr"], roc["tpr"], result.get("image_auroc"))], title="Image-level ROC")
        figures.save_figure(fig, folder / "roc_image.png")
        made["roc_image"] = "roc_image.png"
    proc = curves.get("pixel_roc")
    if proc:
        fig = figures.roc_figure([("pixel", proc["fpr"], proc["tpr"], result.get("pixel_auroc"))], title="Pixel-level ROC")
        figures.save_figure(fig, folder / "roc_pixel.png")
        made["roc_pixel"] = "roc_pixel.png"
    pro = curves.get("pro")
    if pro:
        fig = figures.pro_figure(pro["fpr"], pro["pro"], result.get("aupro"), result.get("aupro_fpr_limit", 0.3))
        figures.save_figure(fig, folder / "pro.png")
        made["pro"] = "pro.png"
    images = result.get("images") or []
    if images:
        good = [r["score"] for r in images if r["label"] == 0]
        bad = [r["score"] for r in images if r["label"] == 1]
        figures.save_figure(figures.score_histogram_figure(good, bad, float(result["threshold"])), folder / "scores.png")
        made["scores"] = "scores.png"
    if result.get("confusion"):
        figures.save_figure(figures.confusion_figure(result["confusion"]), folder / "confusion.png")
        made["confusion"] = "confusion.png"
    return made


# ----------------------------------------------------------------------------- sections


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
    return _e(f"{text} ({result.get('resize', meta.get('resize', 'stretch'))})")


def _summary(result: dict[str, Any], meta: dict[str, Any] | None) -> list[str]:
    meta = meta or {}
    training = meta.get("training") or {}
    pairs = [
        ("model", f"<code>{_e(result.get('model', 'n/a'))}</code>"),
        ("method", _e(result.get("method"))),
        ("backbone", f"{_e(result.get('backbone'))} ({_e(', '.join(result.get('layers') or []))})"),
        ("input size", _input_text(result, meta)),
        ("test data", f"<code>{_e(result.get('data', result.get('dataset')))}</code>"),
        ("trained on", f"{_e(training.get('n_images', 'n/a'))} good images from <code>{_e(training.get('data'))}</code>"
         if training else "n/a"),
        ("test images", f"{result['n_good']} good, {result['n_defective']} defective, {result['n_failed']} failed"),
        ("threshold", _threshold_text(result, meta)),
        ("run", f"{_e(result.get('started', 'n/a'))}, {_num(result.get('seconds'), 1)} s "
                f"({_num(result.get('images_per_second'), 2)} images/s)"),
    ]
    alignment = result.get("alignment")
    if alignment:
        pairs.append(("alignment", f"{_e(alignment['mode'])}: {alignment['n_unaligned']} image(s) could not be aligned "
                                   "and were scored as given"))
    out = ["<h2>Run</h2>", _kv_table(pairs)]
    for path in (alignment or {}).get("unaligned") or []:
        out.append(f'<p class="warn">Not aligned (scored as given): {_e(path)}</p>')
    warning = (meta.get("threshold_info") or {}).get("warning")
    if warning and result.get("threshold") == meta.get("threshold"):
        out.append(f'<p class="warn">Threshold: {_e(warning)}</p>')
    for item in result.get("failed") or []:
        out.append(f'<p class="warn">Not scored: {_e(item["error"] or item["path"])}</p>')
    return out


def _threshold_text(result: dict[str, Any], meta: dict[str, Any]) -> str:
    t = result.get("threshold")
    info = meta.get("threshold_info") or {}
    if meta and t == meta.get("threshold") and info:
        how = _e(info.get("rule", ""))
        n = info.get("n_images")
        return f"{_num(t, 6)} <span class='muted'>({how}; rests on {_e(n)} images)</span>"
    return f"{_num(t, 6)} <span class='muted'>(given on the command line)</span>" if meta else _num(t, 6)


def _metrics(result: dict[str, Any]) -> list[str]:
    limit = result.get("aupro_fpr_limit", 0.3)
    rows = [
        ["image AUROC", _num(result.get("image_auroc")), ""],
        ["image F1-max", _num(result.get("image_f1_max")), f"at score {_num(result.get('image_f1_threshold'), 6)}"],
        ["pixel AUROC", _num(result.get("pixel_auroc")),
         "" if result.get("pixel_auroc_exact") in (None, True) else "binned (approximate)"],
        ["pixel F1-max", _num(result.get("pixel_f1_max")), f"at pixel score {_num(result.get('pixel_f1_threshold'), 6)}"],
        [f"AUPRO (FPR &le; {limit:g})", _num(result.get("aupro")), "per-region overlap, normalised to 1"],
    ]
    out = ["<h2>Metrics</h2>", _table(["metric", "value", "note"], rows, [False, True, False])]
    c = result.get("confusion")
    if c:
        total_good, total_bad = c["tn"] + c["fp"], c["tp"] + c["fn"]
        rows = [
            ["good", str(c["tn"]), str(c["fp"]), _num(c["fp"] / total_good if total_good else None, 3)],
            ["defective", str(c["fn"]), str(c["tp"]), _num(c["fn"] / total_bad if total_bad else None, 3)],
        ]
        out += [f"<h3>Confusion matrix at threshold {_num(result.get('threshold'), 6)}</h3>",
                _table(["truth \\ judged", "good", "defective", "error rate"], rows, [False, True, True, True])]
    return out


def _per_type(result: dict[str, Any]) -> list[str]:
    per = result.get("per_type") or {}
    if not per:
        return []
    rows = []
    for name, d in per.items():
        share = "flagged" if name != "good" else "falsely rejected"
        rows.append([_e(name), str(d["n"]), f"{d['flagged']} ({share})", _num(d["mean_score"]), _num(d.get("auroc"))])
    return ["<h2>Per defect type</h2>",
            "<p class='muted'>AUROC of each defect type against the good images; flagged = score &ge; threshold.</p>",
            _table(["type", "images", "flagged at threshold", "mean score", "AUROC vs good"], rows,
                   [False, True, True, True, True])]


def _card(record: dict[str, Any], overlays: str) -> str:
    wrong = record["judgement"] != record["label"]
    norm = record.get("normalized_score")
    name = Path(record["path"]).name
    caption = (f"<b>{_e(record['defect_type'])}</b>/{_e(name)}<br>score {_num(record['score'])}"
               + (f" ({_num(norm, 2)}&times; threshold)" if norm is not None else "")
               + f"<br>judged {'defective' if record['judgement'] else 'good'}"
               + ("<br><b>not aligned</b>" if record.get("aligned") is False else ""))
    if record.get("overlay"):
        img = f'<img src="{_url(Path(overlays) / record["overlay"])}" alt="{_e(name)} overlay">'
    else:
        img = "<p class='muted'>(no overlay)</p>"
    return f'<div class="card {"wrong" if wrong else "right"}">{img}{caption}</div>'


def _galleries(result: dict[str, Any], overlays: str) -> list[str]:
    images = result.get("images") or []
    good = sorted((r for r in images if r["label"] == 0), key=lambda r: -r["score"])[:GALLERY_SIZE]
    bad = sorted((r for r in images if r["label"] == 1), key=lambda r: r["score"])[:GALLERY_SIZE]
    out = ["<h2>Worst cases</h2>",
           "<p class='muted'>Overlays: colour = anomaly map (green at the model's pixel threshold, red at twice it); "
           "on images judged defective, white outline = pixels above the pixel threshold (yellow: the most anomalous "
           "region when none is above it); images judged good are not outlined; magenta outline = ground truth. "
           "Red frame = wrong judgement. Each overlay's strip gives its verdict, score and threshold.</p>"]
    n_fp = sum(1 for r in images if r["label"] == 0 and r["judgement"] == 1)
    n_fn = sum(1 for r in images if r["label"] == 1 and r["judgement"] == 0)
    out.append(f"<h3>Highest-scoring good images ({n_fp} false positives in all)</h3>")
    out.append('<div class="grid">' + "".join(_card(r, overlays) for r in good) + "</div>" if good else "<p>none</p>")
    out.append(f"<h3>Lowest-scoring defective images ({n_fn} false negatives in all)</h3>")
    out.append('<div class="grid">' + "".join(_card(r, overlays) for r in bad) + "</div>" if bad else "<p>none</p>")
    return out


def _all_images(result: dict[str, Any], overlays: str) -> list[str]:
    images = [r for r in result.get("images") or [] if r.get("overlay")]
    if not images:
        return []
    out = ["<h2>All test images</h2>"]
    for name in dict.fromkeys(r["defect_type"] for r in images):
        group = sorted((r for r in images if r["defect_type"] == name), key=lambda r: -r["score"])
        out.append(f"<h3>{_e(name)} ({len(group)})</h3>")
        out.append('<div class="grid">' + "".join(_card(r, overlays) for r in group) + "</div>")
    return out


# ----------------------------------------------------------------------------- pages


def write_report(
    result: dict[str, Any], out_dir: Path, *, meta: dict[str, Any] | None = None, overlays: str = "overlays"
) -> Path:
    """Write ``out_dir/index.html`` and its figures for one evaluation ``result``; returns the page.

    ``result`` is what :func:`defectscope.evaluation.evaluate_detector` returns; image records
    with an ``"overlay"`` key point into ``out_dir/overlays`` (the ``overlay_dir`` given there).
    ``meta`` is the model's metadata (training data, threshold rule and its warning).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = make_figures(result, out_dir / "figures")
    title = f"defectscope report: {result.get('dataset')} ({result.get('method')})"
    body = [f"<h1>{_e(title)}</h1>"]
    body += _summary(result, meta)
    body += _metrics(result)
    if made:
        body.append("<h2>Figures</h2><div class='figs'>")
        alts = {"roc_image": "image ROC curve", "roc_pixel": "pixel ROC curve", "pro": "PRO curve",
                "scores": "histogram of scores of good and defective images", "confusion": "confusion matrix"}
        for key in ("roc_image", "roc_pixel", "pro", "scores", "confusion"):
            if key in made:
                body.append(f'<img src="{_url(Path("figures") / made[key])}" alt="{alts[key]}">')
        body.append("</div>")
    body += _per_type(result)
    body += _galleries(result, overlays)
    body += _all_images(result, overlays)
    page = out_dir / "index.html"
    page.write_text(_page(title, body), encoding="utf-8")
    log.info("wrote report %s", page)
    return page


_BENCH_COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
                  ("image_f1_max", "image F1-max"), ("images_per_second", "images/s")]


def write_benchmark_index(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """Write ``out_dir/index.html``: one table row per category result, linking its report, plus the mean.

    Each row is a result dict (``dataset``, ``method``, ``backbone`` and the metrics of
    :func:`evaluate_detector`) with an optional ``report``: the category's report folder or
    page (absolute or relative to ``out_dir``). Missing metrics show as n/a and are left out
    of the mean.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["category", "method", "backbone", *(label for _, label in _BENCH_COLUMNS)]
    table_rows = []
    for row in rows:
        name = _e(row.get("dataset", "?"))
        report = row.get("report")
        if report:
            target = Path(report)
            target = target if target.is_absolute() else out_dir / target
            if target.suffix.lower() != ".html":
                target = target / "index.html"
            name = f'<a href="{_url(os.path.relpath(target, out_dir))}">{name}</a>'
        table_rows.append([name, _e(row.get("method", "")), _e(row.get("backbone", "")),
                           *(_num(row.get(key)) for key, _ in _BENCH_COLUMNS)])
    means = []
    for key, _ in _BENCH_COLUMNS:
        values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        means.append(_num(sum(values) / len(values)) if values else "n/a")
    if rows:
        table_rows.append(["<b>mean</b>", "", "", *(f"<b>{m}</b>" for m in means)])
    body = ["<h1>defectscope benchmark</h1>", f"<p>{len(rows)} categories.</p>",
            _table(header, table_rows, [False, False, False, *([True] * len(_BENCH_COLUMNS))])]
    page = out_dir / "index.html"
    page.write_text(_page("defectscope benchmark", body), encoding="utf-8")
    return page
