"""Evaluation figures drawn with matplotlib's Agg backend (no display needed), saved as PNG.

Each ``*_figure`` function takes plain numbers (lists or arrays from an evaluation result) and
returns a matplotlib Figure; :func:`save_figure` writes it as PNG. pyplot is never used, so no
global state is touched and nothing needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

GOOD_COLOUR = "#2b8cbe"
DEFECT_COLOUR = "#e34a33"
THRESHOLD_COLOUR = "#222222"


def _new_figure(width: float = 5.0, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def roc_figure(
    curves: Sequence[tuple[str, Sequence[float], Sequence[float], float | None]], *, title: str = "ROC"
) -> Figure:
    """ROC curves, one per (label, fpr (K,), tpr (K,), auroc); the AUROC goes in the legend."""
    fig, ax = _new_figure()
    for label, fpr, tpr, auroc in curves:
        text = label if auroc is None else f"{label} (AUROC {auroc:.3f})"
        ax.plot(fpr, tpr, lw=2, label=text)
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def pro_figure(fpr: Sequence[float], pro: Sequence[float], aupro: float | None, fpr_limit: float) -> Figure:
    """Per-region overlap against pixel FPR up to ``fpr_limit``; AUPRO (normalised) in the legend."""
    fig, ax = _new_figure()
    text = "PRO" if aupro is None else f"PRO (AUPRO@{fpr_limit:g} {aupro:.3f})"
    ax.plot(fpr, pro, lw=2, color=DEFECT_COLOUR, label=text)
    ax.set(
        xlim=(0, fpr_limit),
        ylim=(0, 1.01),
        xlabel="pixel false positive rate",
        ylabel="per-region overlap",
        title="PRO curve",
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def score_histogram_figure(
    good: Sequence[float], defective: Sequence[float], threshold: float, *, xlabel: str = "anomaly score"
) -> Figure:
    """Score vs frequency: histograms of good and defective image scores, threshold as a vertical line."""
    fig, ax = _new_figure(6.0, 4.0)
    good_a = np.asarray(good, dtype=np.float64)
    bad_a = np.asarray(defective, dtype=np.float64)
    both = np.r_[good_a, bad_a, threshold] if np.isfinite(threshold) else np.r_[good_a, bad_a]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    if good_a.size:
        ax.hist(good_a, bins=bins, alpha=0.6, color=GOOD_COLOUR, label=f"good ({good_a.size})")
    if bad_a.size:
        ax.hist(bad_a, bins=bins, alpha=0.6, color=DEFECT_COLOUR, label=f"defective ({bad_a.size})")
    if np.isfinite(threshold):
        ax.axvline(threshold, color=THRESHOLD_COLOUR, ls="--", lw=2, label=f"threshold {threshold:.4g}")
    ax.set(xlabel=xlabel, ylabel="number of images", title="Scores of good and defective images")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def confusion_figure(confusion: dict[str, int]) -> Figure:
    """The 2x2 confusion matrix at the model's threshold (rows: truth, columns: judgement)."""
    fig, ax = _new_figure(3.6, 3.2)
    cells = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    ax.imshow(cells, cmap="Blues")
    for (i, j), value in np.ndenumerate(cells):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if value > cells.max() / 2 else "black",
        )
    ax.set_xticks([0, 1], ["judged good", "judged defective"])
    ax.set_yticks([0, 1], ["good", "defective"])
    ax.set_title("At the model's threshold")
    return fig


def _percent_label(rate: float) -> str:
    return f"{rate * 100:.1f}".rstrip("0").rstrip(".") + " %"


def tradeoff_figure(
    fpr: Sequence[float],
    tpr: Sequence[float],
    *,
    points: Sequence[tuple[float, float, tuple[float, float]]] = (),
    model: tuple[float, float] | None = None,
    resolution: float | None = None,
) -> Figure:
    """Catch rate against false-reject rate (log x axis): the image ROC read as a line feels it.

    fpr, tpr: the image ROC curve (K,) (false-reject rate = FPR on good images, catch rate = TPR on
    defective images). points: the table's operating points, (false-reject rate, catch rate, catch
    rate's interval (low, high)). model: (false-reject rate, catch rate) at the model's threshold,
    drawn as a marker. resolution: 1 / number of good images; rates below it cannot be told apart
    and are shaded. A false-reject rate of 0 has no place on a log axis: it is drawn at a position
    left of every other, whose tick reads "0". The y axis starts at 0, or closer to the catch rates
    shown when all of them are above 50 % (the tick labels say where).
    """
    fig, ax = _new_figure(6.4, 4.4)
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    smallest = min([0.005, *(p[0] for p in points if p[0] > 0), *x[x > 0].tolist()])
    if resolution:
        smallest = min(smallest, resolution)
    zero = smallest / 2  # where a false-reject rate of 0 is drawn
    ax.set_xscale("log")
    if resolution and resolution > zero:
        ax.axvspan(
            zero / 1.5,
            resolution,
            color="#eeeeee",
            zorder=0,
            label=f"below 1/{round(1 / resolution)}: no good part rejected",
        )
    ax.plot(np.maximum(x, zero), y, lw=2, color=DEFECT_COLOUR, label="catch rate", zorder=2)
    lows = [float(y[x <= 0].max()) if (x <= 0).any() else 0.0]
    if points:
        px = np.maximum([p[0] for p in points], zero)
        py = np.array([p[1] for p in points])
        err = np.array([[p[1] - p[2][0] for p in points], [p[2][1] - p[1] for p in points]])
        ax.errorbar(
            px, py, yerr=err, fmt="o", color=GOOD_COLOUR, capsize=3, ms=5, label="table rows (95 % interval)", zorder=3
        )
        lows += [p[2][0] for p in points]
    if model is not None:
        ax.plot(
            max(model[0], zero),
            model[1],
            marker="D",
            ms=9,
            color=THRESHOLD_COLOUR,
            ls="none",
            label=f"model threshold ({_percent_label(model[0])} rejected, {_percent_label(model[1])} caught)",
            zorder=4,
        )
        lows.append(model[1])
    bottom = min(lows)
    bottom = 0.0 if bottom <= 0.5 else float(np.floor((bottom - 0.02) * 10) / 10)
    ticks = [t for t in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if t > zero * 1.5]
    ax.set_xticks([zero, *ticks], ["0", *(_percent_label(t) for t in ticks)])
    ax.minorticks_off()
    ax.set(
        xlim=(zero / 1.5, 1.0),
        ylim=(bottom, 1.0 + (1.0 - bottom) * 0.02),
        xlabel="false-reject rate (good parts rejected, log scale)",
        ylabel="catch rate (defective parts rejected)",
        title="Catch rate against false-reject rate",
    )
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))  # whole percents: the range is >= 10 %
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v * 100:.0f} %")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig
