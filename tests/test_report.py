"""The HTML report and its figures: built from hand-made evaluation results, and from `evaluate --report`."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from defectscope.report import figures
from defectscope.report.html import render_benchmark_summary, write_benchmark_index, write_report


def make_result(
    folder: Path, *, n_good: int = 6, n_bad: int = 6, threshold: float = 1.0, seed: int = 0
) -> dict[str, Any]:
    """An evaluation result like evaluate_detector's, with small overlay PNGs under folder/overlays."""
    rng = np.random.default_rng(seed)
    images = []
    types = ["good"] * n_good + ["crack <b>&"] * (n_bad // 2) + ["hole"] * (n_bad - n_bad // 2)
    for i, kind in enumerate(types):
        label = int(kind != "good")
        score = float(rng.uniform(0.2, 1.1) if not label else rng.uniform(0.8, 2.0))
        rel = f"{kind}/{i:05d}_img{i}_heatmap.png"
        (folder / "overlays" / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "overlays" / rel)
        images.append(
            {
                "path": f"/data/test/{kind}/img{i}.png",
                "label": label,
                "defect_type": kind,
                "score": score,
                "normalized_score": score / threshold,
                "judgement": int(score >= threshold),
                "overlay": rel,
            }
        )
    labels = np.array([r["label"] for r in images])
    scores = np.array([r["score"] for r in images])
    from defectscope.evaluation.evaluate import image_metrics

    out = image_metrics(labels, scores, [r["defect_type"] for r in images], threshold)
    fpr = np.linspace(0, 1, 50)
    return {
        "dataset": "widget",
        "method": "patchcore",
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.2"],
        "image_size": 64,
        "started": "2025-01-01T00:00:00+00:00",
        "model": "/models/w.dsmodel",
        "data": "/data",
        **{k: v for k, v in out.items() if not k.startswith("_")},
        "pixel_auroc": 0.97,
        "pixel_auroc_exact": True,
        "pixel_f1_max": 0.61,
        "pixel_f1_threshold": 1.3,
        "aupro": 0.88,
        "aupro_fpr_limit": 0.3,
        "n_good": n_good,
        "n_defective": n_bad,
        "n_failed": 1,
        "failed": [{"path": "/data/test/good/broken.png", "error": "/data/test/good/broken.png: truncated PNG"}],
        "threshold": threshold,
        "seconds": 1.5,
        "images_per_second": 8.0,
        "images": images,
        "curves": {
            "image_roc": out["_image_roc"],
            "pixel_roc": {"fpr": list(fpr), "tpr": list(np.sqrt(fpr))},
            "pro": {"fpr": list(fpr * 0.3), "pro": list(np.sqrt(fpr))},
        },
    }


META = {
    "image_size": 64,
    "threshold": 1.0,
    "training": {"data": "/data/train", "n_images": 24},
    "threshold_info": {
        "rule": "quantile of leave-one-image-out scores",
        "n_images": 24,
        "warning": "threshold rests on only 24 good images",
    },
}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("src"):
            self.srcs.append(a["src"])
        if a.get("href"):
            self.hrefs.append(a["href"])


def _links(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_report_is_self_contained(tmp_path):
    result = make_result(tmp_path)
    page = write_report(result, tmp_path, meta=META)
    links = _links(page)
    assert len(links.srcs) >= 5 + 12  # five figures, every overlay at least once
    from urllib.parse import unquote

    for src in links.srcs:
        assert not re.match(r"^[a-z]+:|^/", src), src  # relative, no scheme, no absolute path
        target = tmp_path / unquote(src)
        assert target.is_file(), src
        with Image.open(target) as im:
            assert im.size[0] > 0
    assert all(h.startswith("data:") or not re.match(r"^[a-z]+:", h) for h in links.hrefs)
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for name in ("roc_image", "roc_pixel", "pro", "scores", "confusion"):
        assert f"figures/{name}.png" in text


def test_report_content(tmp_path):
    result = make_result(tmp_path)
    text = write_report(result, tmp_path, meta=META).read_text()
    for needle in (
        "widget",
        "tf_efficientnet_lite0",
        "/models/w.dsmodel",
        "AUPRO",
        "0.8800",
        "0.9700",
        "0.6100",
        "6 good, 6 defective, 1 failed",
        "rests on only 24 good images",
        "truncated PNG",
        "Per defect type",
        "hole",
        "2025-01-01",
    ):
        assert needle in text, needle
    assert "crack &lt;b&gt;&amp;" in text and "crack <b>&" not in text  # names are escaped
    c = result["confusion"]
    assert f'<td class="num">{c["tn"]}</td><td class="num">{c["fp"]}</td>' in text
    # worst false positives gallery: the good images, highest score first
    section = text.split("Highest-scoring good images")[1].split("Lowest-scoring defective")[0]
    names = re.findall(r"good</b>/img(\d+)\.png", section)
    goods = sorted((r for r in result["images"] if r["label"] == 0), key=lambda r: -r["score"])
    assert [int(n) for n in names] == [int(Path(r["path"]).stem[3:]) for r in goods]
    # worst false negatives: the defective images, lowest score first
    bad_section = text.split("Lowest-scoring defective")[1].split("All test images")[0]
    names = re.findall(r"</b>/img(\d+)\.png", bad_section)
    bads = sorted((r for r in result["images"] if r["label"] == 1), key=lambda r: r["score"])
    assert [int(n) for n in names] == [int(Path(r["path"]).stem[3:]) for r in bads]


def test_report_without_pixel_metrics_or_meta(tmp_path):
    result = make_result(tmp_path)
    result.update(pixel_auroc=None, pixel_f1_max=None, pixel_f1_threshold=None, aupro=None)
    result["curves"].update(pixel_roc=None, pro=None)
    text = write_report(result, tmp_path).read_text()
    assert "roc_pixel.png" not in text and "pro.png" not in text and "roc_image.png" in text
    assert "n/a" in text


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_report_shows_the_operating_point(tmp_path):
    result = make_result(tmp_path, n_good=30, n_bad=40)
    text = write_report(result, tmp_path, meta=META).read_text()
    section = _section(text, '<h2 id="operating-point">Operating point</h2>', "<h2>Figures</h2>")
    assert "figures/tradeoff.png" in section and (tmp_path / "figures" / "tradeoff.png").is_file()
    op = result["operating_points"]
    rows = re.findall(r"<tr[^>]*><td>(at most [^<]+|model threshold)</td>(.*?)</tr>", section)
    assert [name for name, _ in rows] == [
        "at most 0.5 %",
        "at most 1 %",
        "at most 2 %",
        "at most 5 %",
        "model threshold",
    ]
    for (_, cells), row in zip(rows, [*op["at_false_reject"], op["at_threshold"]]):
        fr, c = row["false_reject"], row["catch"]
        assert f'<td class="num">{fr["count"]}/30</td>' in cells and f'<td class="num">{c["count"]}/40</td>' in cells
        assert f"{c['rate'] * 100:.1f} % [{c['ci'][0] * 100:.1f} %, {c['ci'][1] * 100:.1f} %]" in cells
    assert '<tr class="own"><td>model threshold</td>' in section
    # 30 good images: one false reject is 3.3 %, so 0.5, 1 and 2 % cannot be told from none
    assert "one false reject is 3.3 %, so the rows at 0.5 %, 1 %, 2 % all mean none of them rejected" in section
    per_type = _section(section, "Catch rate per defect type", "</table>")
    assert "crack &lt;b&gt;&amp;" in per_type and "<td>hole</td>" in per_type
    hole = op["per_type"]["hole"]["at_threshold"]
    assert f"{hole['count']}/{hole['n']} = {hole['rate'] * 100:.1f} %" in per_type


def test_report_without_good_images_says_why(tmp_path):
    result = make_result(tmp_path, n_good=0, n_bad=6)
    assert result["image_auroc"] is None and result["image_f1_max"] is None
    text = write_report(result, tmp_path, meta=META).read_text()
    metrics_table = _section(text, "<h2>Metrics</h2>", "</table>")
    assert "hold out some good photos" in metrics_table and "F1 1.0" in metrics_table
    section = _section(text, '<h2 id="operating-point">Operating point</h2>', "<h2>Figures</h2>")
    assert '<p class="warn">no good test images' in section
    assert "tradeoff.png" not in text  # no ROC without good images
    c = result["operating_points"]["at_threshold"]["catch"]
    assert f'<td class="num">0/0</td><td class="num">n/a</td><td class="num">{c["count"]}/6</td>' in section


def test_tradeoff_figure_log_axis_points_and_marker():
    fpr = [0.0, 0.0, 0.1, 0.1, 0.5, 1.0]
    tpr = [0.0, 0.6, 0.6, 0.9, 0.95, 1.0]
    points = [(0.0, 0.6, (0.55, 0.8)), (0.1, 0.9, (0.7, 0.98))]
    fig = figures.tradeoff_figure(fpr, tpr, points=points, model=(0.1, 0.9), resolution=0.1)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    zero = ax.get_xticks()[0]  # where a rate of 0 is drawn: left of every other rate
    assert ax.get_xticklabels()[0].get_text() == "0" and 0 < ax.get_xlim()[0] < zero < 0.005
    assert ax.get_xlim()[1] == 1.0
    curve = ax.get_lines()[0]
    assert list(curve.get_ydata()) == tpr and curve.get_xdata()[0] == zero
    assert ax.get_ylim()[0] == pytest.approx(0.5)  # every catch rate shown is above 50 %: the axis starts near them
    low = figures.tradeoff_figure(fpr, tpr, points=[(0.0, 0.6, (0.4, 0.8))], resolution=0.1)
    assert low.axes[0].get_ylim()[0] == 0.0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "model threshold (10 % rejected, 90 % caught)" in labels
    assert "below 1/10: no good part rejected" in labels
    marker = next(ln for ln in ax.get_lines() if ln.get_marker() == "D")
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (0.1, 0.9)


def test_roc_figure_legend_has_auroc():
    fig = figures.roc_figure([("image", [0, 0.5, 1], [0, 0.9, 1], 0.9123)])
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "image (AUROC 0.912)" in texts
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0, 0.5, 1]


def test_pro_figure_legend_and_limit():
    fig = figures.pro_figure([0, 0.1, 0.3], [0, 0.5, 0.9], 0.75, 0.3)
    ax = fig.axes[0]
    assert ax.get_xlim() == (0, 0.3)
    assert "AUPRO@0.3 0.750" in ax.get_legend().get_texts()[0].get_text()


def test_score_histogram_counts_and_threshold_line():
    good, bad = [0.1, 0.2, 0.2, 0.3], [0.9, 1.5, 2.0]
    fig = figures.score_histogram_figure(good, bad, 0.5)
    ax = fig.axes[0]
    heights = [sum(p.get_height() for p in c) for c in ax.containers]
    assert heights == [4, 3]
    vline = [ln for ln in ax.get_lines() if ln.get_xdata()[0] == ln.get_xdata()[1]]
    assert vline and vline[0].get_xdata()[0] == 0.5
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["good (4)", "defective (3)", "threshold 0.5"]


def test_save_figure_writes_png(tmp_path):
    path = figures.save_figure(figures.confusion_figure({"tp": 3, "fp": 1, "tn": 5, "fn": 2}), tmp_path / "a" / "c.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_benchmark_index_links_and_means(tmp_path):
    (tmp_path / "bottle").mkdir()
    rows = [
        {
            "dataset": "bottle",
            "method": "patchcore",
            "backbone": "b",
            "image_auroc": 1.0,
            "pixel_auroc": 0.98,
            "aupro": 0.9,
            "report": "bottle",
        },
        {
            "dataset": "cable",
            "method": "patchcore",
            "backbone": "b",
            "image_auroc": 0.9,
            "pixel_auroc": None,
            "aupro": 0.8,
            "report": str(tmp_path / "cable" / "index.html"),
        },
        {"dataset": "no<report>", "method": "padim", "backbone": "b", "image_auroc": 0.5},
    ]
    page = write_benchmark_index(rows, tmp_path)
    text = page.read_text()
    links = _links(page).hrefs
    assert "bottle/index.html" in links and "cable/index.html" in links
    assert "no&lt;report&gt;" in text and "3 categories" in text
    mean_row = text.split("<b>mean</b>")[1]
    assert "0.8000" in mean_row.split("</tr>")[0]  # image AUROC mean of 1.0, 0.9, 0.5
    assert "0.9800" in mean_row.split("</tr>")[0]  # pixel AUROC mean ignores the missing one
    assert "0.8500" in mean_row.split("</tr>")[0]


HOSTILE = "crack\"'><script>alert(1)</script>&amp;"
"""A defect type / name that would run script or break out of an attribute if it were not escaped."""
HOSTILE_FILE = "x\"' onerror='alert(2)'><img src=y>.png"
"""A file name (no slash) that would add an image with an ``onerror`` handler if it were not escaped."""


class _Tags(HTMLParser):
    """Every tag with its attributes, the page's text (entities decoded) and its title."""

    def __init__(self, page: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(page.read_text(encoding="utf-8"))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def check_inert(self) -> None:
        """No script element, no event-handler attribute, only the images the page itself puts there."""
        assert "script" not in {tag for tag, _ in self.tags}
        assert not [(tag, name) for tag, attrs in self.tags for name in attrs if name.startswith("on")]
        srcs = [attrs["src"] for tag, attrs in self.tags if tag == "img"]
        assert all(s.startswith(("figures/", "overlays/")) for s in srcs), srcs


def test_hostile_strings_are_escaped(tmp_path):
    result = make_result(tmp_path)
    for record in result["images"]:
        if record["defect_type"] == "hole":
            record["defect_type"] = HOSTILE
    result["per_type"][HOSTILE] = result["per_type"].pop("hole")
    result["images"][0]["path"] = f"/data/test/good/{HOSTILE_FILE}"
    result.update(
        dataset=HOSTILE,
        model=HOSTILE,
        data=HOSTILE,
        backbone=HOSTILE,
        layers=[HOSTILE],
        failed=[{"path": HOSTILE_FILE, "error": HOSTILE}],
        alignment={"mode": HOSTILE, "n_unaligned": 1, "unaligned": [HOSTILE_FILE]},
    )
    meta = {
        **META,
        "training": {"data": HOSTILE, "n_images": 24},
        "threshold_info": {"rule": HOSTILE, "n_images": 24, "warning": HOSTILE},
    }
    page = write_report(result, tmp_path, meta=meta)
    tags = _Tags(page)
    tags.check_inert()
    text = "".join(tags.text)
    assert "<script" not in page.read_text()
    # the strings come through as text, unchanged once the browser decodes the entities
    assert f"defectscope report: {HOSTILE} (patchcore)" in text
    for needle in (
        f"Not scored: {HOSTILE}",
        f"Threshold: {HOSTILE}",
        f"({HOSTILE}; rests on 24 images)",
        f"Not aligned (scored as given): {HOSTILE_FILE}",
        f"{HOSTILE}/img9.png",
    ):
        assert needle in text, needle
    assert text.count(HOSTILE) >= 10 + 3 * 2  # title, h1, run table, warnings, per-type row; 3 cards twice
    alts = [attrs["alt"] for tag, attrs in tags.tags if tag == "img" and attrs["src"].startswith("overlays/good/00000")]
    assert alts and set(alts) == {f"{HOSTILE_FILE} overlay"}


def test_hostile_strings_are_escaped_in_benchmark_pages(tmp_path):
    page = write_benchmark_index(
        [{"dataset": HOSTILE, "method": HOSTILE, "backbone": HOSTILE, "image_auroc": 0.5, "report": HOSTILE_FILE}],
        tmp_path,
    )
    tags = _Tags(page)
    tags.check_inert()
    assert [attrs["href"] for tag, attrs in tags.tags if tag == "a"] == [
        quote(f"{HOSTILE_FILE}/index.html")
    ]  # a relative URL, percent-encoded
    assert "".join(tags.text).count(HOSTILE) == 3
    top = tmp_path / "top.html"
    top.write_text(
        render_benchmark_summary(
            [
                {
                    "name": HOSTILE,
                    "href": "x/index.html",
                    "image_auroc": 0.5,
                    "pixel_auroc": None,
                    "n_ok": 1,
                    "n_categories": 1,
                }
            ]
        )
    )
    tags = _Tags(top)
    tags.check_inert()
    assert f"{HOSTILE}: mean image AUROC 0.5000, pixel AUROC n/a over 1 of 1 categories" in "".join(tags.text)


def test_evaluate_cli_writes_report(synthetic_category, tmp_path, capsys):
    from defectscope.cli.commands import main

    model = tmp_path / "m.dsmodel"
    assert (
        main(
            [
                "fit",
                str(synthetic_category),
                "-o",
                str(model),
                "--image-size",
                "64",
                "--coreset-ratio",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    out_json = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                str(model),
                str(synthetic_category),
                "--report",
                str(tmp_path / "rep"),
                "--json",
                str(out_json),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr()[0]
    assert "aupro" in out and "wrote report" in out
    assert "operating points" in out and "model threshold" in out and "catch rate % by type" in out
    page = tmp_path / "rep" / "index.html"
    from urllib.parse import unquote

    srcs = _links(page).srcs
    overlays = [s for s in srcs if s.startswith("overlays/")]
    assert len(set(overlays)) == 20 and all((tmp_path / "rep" / unquote(s)).is_file() for s in srcs)
    import json

    result = json.loads(out_json.read_text())
    for key in ("aupro", "pixel_f1_max", "image_f1_max", "per_type_auroc", "curves", "operating_points"):
        assert result[key] is not None, key
    assert set(result["per_type_auroc"]) == {"scratch", "spot"}
    op = result["operating_points"]  # --json carries it whole
    assert len(op["at_false_reject"]) == 4 and set(op["per_type"]) == {"scratch", "spot"}
    assert op["at_threshold"]["threshold"] == result["threshold"]
    assert "figures/tradeoff.png" in page.read_text()


def test_unaligned_images_are_flagged_in_the_report(tmp_path):
    result = make_result(tmp_path)
    for record in result["images"]:
        record["aligned"] = True
    result["images"][0]["aligned"] = False
    result["images"][0]["overlay"] = "x.png"
    (tmp_path / "overlays").mkdir(exist_ok=True)
    result["alignment"] = {"mode": "rigid", "n_unaligned": 1, "unaligned": [result["images"][0]["path"]]}
    text = write_report(result, tmp_path, meta=META).read_text()
    assert "rigid: 1 image(s) could not be aligned" in text
    assert f"Not aligned (scored as given): {result['images'][0]['path']}" in text
    assert text.count("<b>not aligned</b>") >= 1
    plain = write_report(make_result(tmp_path / "plain"), tmp_path / "plain", meta=META).read_text()
    assert "not aligned" not in plain.lower()
