"""Evaluate a fitted detector on labelled test data: image/pixel AUROC, AUPRO, F1-max, operating
points (catch rate at false-reject rates, :mod:`.operating`), counts, speed.

Memory stays bounded: anomaly maps are folded into a :class:`metrics.PixelMetrics` accumulator
(and, when asked, written to disk as overlays) one image at a time; only per-image scores and
down-sampled curves are kept.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.images import load_mask
from ..data.samples import Sample, Split
from ..detectors.base import Detector
from ..errors import DefectscopeError
from ..scoring import normalized_score, score_paths
from . import metrics, operating

log = logging.getLogger(__name__)

AUPRO_FPR_LIMIT = 0.3
"""Bergmann et al. (IJCV 2021) integrate the PRO curve up to this false-positive rate."""

CURVE_POINTS = 512
"""Curves stored in the result are thinned to about this many points (plots only need that many)."""

OVERLAY_MAX_SIDE = 320
#: evaluation protocols (see :func:`evaluate_detector`)
PROTOCOLS = ("native", "mvtec")
"""Longest side, in pixels, of the per-image overlays written for a report."""


def evaluate_detector(
    detector: Detector,
    split: Split,
    threshold: float,
    *,
    batch_size: int = 16,
    progress: bool = False,
    heatmap_dir: Path | None = None,
    overlay_dir: Path | None = None,
    overlay_max_side: int = OVERLAY_MAX_SIDE,
    aligner: Any | None = None,
    pixel_threshold: float | None = None,
    protocol: str = "native",
    judge: Any | None = None,
) -> dict[str, Any]:
    """Score every test sample of ``split`` and compute the metrics.

    The result holds, besides image/pixel AUROC, AUPRO, F1-max and the confusion matrix,
    ``operating_points``: the catch rate (share of defective images judged defective) at false-reject
    rates of 0.5, 1, 2 and 5 % with the threshold each needs, both rates at ``threshold`` and a row
    per defect type, each with its 95 % Clopper-Pearson interval
    (:func:`defectscope.evaluation.operating.operating_points`); and ``null_reasons``: why a metric
    is None (e.g. no good test images, with the folder to hold good photos out into).

    Pixel metrics compare each anomaly map over the photo (:attr:`ImageResult.map`, at about the
    model's input resolution, the resize protocol undone) with its ground-truth mask resized to the
    map's shape (nearest neighbour); they are None when any defective image lacks a
    mask. Images that fail to load are counted and listed, never silently dropped.

    heatmap_dir: full-resolution overlays, ``<type>/<index>_<stem>_heatmap.png`` (photo and overlay side
    by side, with a legend); each image record then holds ``"heatmap"``, the PNG's path.
    pixel_threshold: what overlays colour and outline against (see :mod:`defectscope.report.heatmaps`);
    None uses ``threshold``.
    protocol: "native" compares maps and masks at the map's own size (about the model's input); "mvtec" follows the
    literature: each map is upsampled (bilinear) to its mask's own resolution and compared there, and
    ``image_auroc_map_max`` (the classification AUROC from each map's maximum) is reported beside
    the method's own image score.
    overlay_dir: small overlays for a report (longest side ``overlay_max_side``); each image
    record then holds ``"overlay"``, the PNG's path relative to ``overlay_dir``.
    aligner: a :class:`defectscope.components.align.Aligner`; images are warped into its reference frame
    for scoring and maps are warped back to each image's own frame before the pixel
    metrics and overlays, so maps and masks are compared in the photo's frame. Each image
    record then holds ``"aligned"``; the result holds ``"alignment"`` (mode, unaligned paths; for the ECC
    modes also the paths where ECC kept the first pose, ``"unrefined"``).
    judge: a :class:`defectscope.judging.JudgeRule` (a model judged by region): image scores are the rule's.
    """
    from ..report.heatmaps import Verdict, resize_map

    if protocol not in PROTOCOLS:
        raise DefectscopeError(f"unknown evaluation protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    pix = threshold if pixel_threshold is None else pixel_threshold
    samples = split.test
    if not samples:
        raise DefectscopeError(f"{split.name}: no test images found")
    n_defective = sum(s.label == 1 for s in samples)
    if n_defective == len(samples):  # said before the long work, and again in the result
        log.warning("%s: %s", split.name, no_good_images_reason(samples))
    n_masked = sum(s.mask_path is not None for s in samples if s.label == 1)
    has_masks = 0 < n_defective == n_masked
    if not has_masks and n_masked:  # the layout already named the images without a mask
        log.info(
            "%s: %d of %d defective images have no mask; pixel metrics are skipped",
            split.name,
            n_defective - n_masked,
            n_defective,
        )
    elif not has_masks:
        log.info("%s: no ground-truth masks; pixel metrics are skipped", split.name)
    pixel = metrics.PixelMetrics() if has_masks else None
    keep_maps = pixel is not None or heatmap_dir is not None or overlay_dir is not None or protocol == "mvtec"
    full_res = protocol == "mvtec"

    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    mask_errors: list[dict[str, str]] = []
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    n_scored = 0
    results = score_paths(
        detector,
        [s.path for s in samples],
        threshold,
        batch_size=batch_size,
        keep_maps=keep_maps,
        progress=progress,
        aligner=aligner,
        rule=judge,
    )
    for sample, result in zip(samples, results):
        if not result.ok:
            failed.append({"path": str(sample.path), "error": result.error or ""})
            continue
        mask = None
        if pixel is not None and result.map is not None:
            shape = result.size if full_res else result.map.shape
            try:
                mask = (
                    load_mask(sample.mask_path, size=shape, image=sample.path, image_shape=result.size)
                    if sample.mask_path is not None
                    else np.zeros(shape, dtype=bool)
                )
            except DefectscopeError as exc:  # a mask that does not fit its image: left out of the pixel metrics
                mask_errors.append({"path": str(sample.path), "mask": str(sample.mask_path), "error": str(exc)})
            if mask is not None and sample.label == 1 and not mask.any():
                log.warning(
                    "%s: the mask of this defective image (%s) marks no pixel at the %dx%d resolution the maps "
                    "are compared at",
                    sample.path,
                    sample.mask_path,
                    shape[1],
                    shape[0],
                )
        n_scored += 1
        record: dict[str, Any] = {
            "path": str(sample.path),
            "label": sample.label,
            "defect_type": sample.defect_type,
            "score": result.score,
            "normalized_score": normalized_score(result.score, threshold),
            "judgement": result.judgement,
        }
        if result.notes:
            record["notes"] = result.notes
            for note in result.notes:
                log.warning("%s: %s", sample.path, note)
        if result.alignment is not None:
            record["aligned"] = result.alignment["aligned"]
            record["align_inliers"] = result.alignment["inliers"]
            record["align_angle"] = result.alignment["angle"]
            if "refined" in result.alignment:  # ECC modes: False when ECC kept the first pose (note says why)
                record["align_refined"] = result.alignment["refined"]
                if "refine_note" in result.alignment:
                    record["align_refine_note"] = result.alignment["refine_note"]
        records.append(record)
        if result.map is None:
            continue
        if full_res:
            record["map_max"] = float(result.map.max())
        if mask is not None:
            amap = resize_map(result.map, mask.shape) if full_res else result.map
            pixel.add(amap[None], mask[None])
        verdict = Verdict(score=float(result.score), threshold=threshold, judgement=int(result.judgement))
        if heatmap_dir is not None:
            record["heatmap"] = _write_heatmap(
                heatmap_dir, sample, result.map, pix, verdict, len(records) - 1, roi=result.roi
            )
        if overlay_dir is not None:
            record["overlay"] = _write_overlay(
                overlay_dir, sample, result.map, pix, verdict, len(records) - 1, overlay_max_side, roi=result.roi
            )
    seconds = time.perf_counter() - start

    labels = np.array([r["label"] for r in records], dtype=np.int64)
    scores = np.array([r["score"] for r in records], dtype=np.float64)
    types = [r["defect_type"] for r in records]
    out: dict[str, Any] = {
        "dataset": split.name,
        "method": detector.method,
        "backbone": detector.backbone,
        "layers": list(detector.layers or []),
        "image_size": detector.image_size,
        "resize": detector.resize,
        "tiles": getattr(detector, "tiles", 1),
        "started": started,
    }
    out["protocol"] = protocol
    out.update(image_metrics(labels, scores, types, threshold, good_hint=_good_folder_hint(samples)))
    if full_res:
        out["image_auroc_map_max"] = metrics.image_auroc(labels, np.array([r["map_max"] for r in records]))
    out.update(pixel_metrics(pixel))
    out.update(
        {
            "n_good": int((labels == 0).sum()),
            "n_defective": int((labels == 1).sum()),
            "n_failed": len(failed),
            "failed": failed,
            "mask_errors": mask_errors,
            "threshold": threshold,
            "seconds": round(seconds, 3),
            "images_per_second": round(n_scored / seconds, 3) if seconds > 0 else None,
            "images": records,
        }
    )
    if aligner is not None:
        unaligned = [r["path"] for r in records if r.get("aligned") is False]
        out["alignment"] = {"mode": aligner.mode, "n_unaligned": len(unaligned), "unaligned": unaligned}
        if aligner.ecc:
            unrefined = [r["path"] for r in records if r.get("align_refined") is False]
            out["alignment"] |= {"n_unrefined": len(unrefined), "unrefined": unrefined}
    out["curves"] = {"image_roc": out.pop("_image_roc"), "pixel_roc": out.pop("_pixel_roc"), "pro": out.pop("_pro")}
    return out


def image_metrics(
    labels: np.ndarray, scores: np.ndarray, types: list[str], threshold: float, *, good_hint: str | None = None
) -> dict[str, Any]:
    """Image-level metrics of scores (N,) against labels (N,) and defect types (N,).

    Keys: image_auroc, image_f1_max, image_f1_threshold, per_type_auroc, per_type (counts,
    detected at ``threshold``, mean score), confusion (at ``threshold``), operating_points
    (:func:`defectscope.evaluation.operating.operating_points` at ``threshold``: the catch rate at
    false-reject rates of 0.5, 1, 2 and 5 %, both rates at ``threshold``, a row per defect type),
    null_reasons (metric -> why it is None, e.g. no good test images), _image_roc (thinned curve or
    None). ``good_hint`` says where good test images go (see :func:`no_good_images_reason`).

    F1-max is None without good images as well as without defective ones: with defective images
    only, every threshold at or below the lowest score has precision 1 and F1 1.0, whatever the model.
    """
    empty = len(labels) == 0
    out: dict[str, Any] = {
        "image_auroc": None,
        "image_f1_max": None,
        "image_f1_threshold": None,
        "per_type_auroc": {},
        "per_type": {},
        "confusion": None,
        "operating_points": None,
        "null_reasons": {},
        "_image_roc": None,
    }
    if empty:
        return out
    has_good, has_bad = bool((labels == 0).any()), bool((labels == 1).any())
    out["image_auroc"] = metrics.image_auroc(labels, scores)
    if has_good and has_bad:
        f1, t = metrics.f1_max(labels, scores)
        out["image_f1_max"], out["image_f1_threshold"] = f1, t
    reasons: dict[str, str] = out["null_reasons"]
    if not has_good:
        why = no_good_images_reason(hint=good_hint)
        reasons["image_auroc"] = why
        reasons["image_f1_max"] = (
            "no good test images: every threshold at or below the lowest score would have precision 1 and F1 1.0, "
            "whatever the model"
        )
        reasons["false_reject"] = why
    if not has_bad:
        why = "no defective test images: image AUROC, F1-max and the catch rate need some"
        reasons["image_auroc"] = reasons["image_f1_max"] = reasons["catch"] = why
    out["per_type_auroc"] = metrics.per_type_auroc(labels, scores, types)
    out["confusion"] = metrics.confusion_at(labels, scores, threshold)
    out["operating_points"] = operating.operating_points(labels, scores, threshold=threshold, types=types)
    names = np.asarray(types, dtype=object)
    for name in dict.fromkeys(types):
        keep = names == name
        s = scores[keep]
        out["per_type"][name] = {
            "n": int(keep.sum()),
            "flagged": int((s >= threshold).sum()),  # same rule as scoring.judge
            "mean_score": float(s.mean()),
            "auroc": out["per_type_auroc"].get(name),
        }
    if has_good and has_bad:
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
        out["_image_roc"] = {"fpr": _thin(fpr), "tpr": _thin(tpr)}
    return out


def _good_folder_hint(samples: list[Sample]) -> str | None:
    """Where good test images go in the layout ``samples`` came from, read from a defective image's
    path: ``<category>/test/good/`` (MVTec AD), ``<object>/test/Normal/`` (VisA), ``<folder>/good/``
    (plain folder); None without defective images."""
    for sample in samples:
        if sample.label != 1:
            continue
        type_dir = Path(sample.path).parent
        root = type_dir.parent
        if root.name == "test" and type_dir.name == "Anomaly":
            return f"{root / 'Normal'}/ (the VisA object's good test images)"
        if root.name == "test":
            return f"{root / 'good'}/ (the MVTec AD category's good test images)"
        return f"{root / 'good'}/ (the plain folder's good images, beside the defect-type folders)"
    return None


def no_good_images_reason(samples: list[Sample] | None = None, *, hint: str | None = None) -> str:
    """Why image AUROC, F1-max and the false-reject rate are null without good test images, and what to
    do: hold out good photos the model was not fitted on, in the folder ``hint`` (or the one the
    layout of ``samples`` uses) names."""
    hint = hint or (_good_folder_hint(samples) if samples else None)
    where = (
        f"put them in {hint}"
        if hint
        else "put them in test/good/ of an MVTec AD category, test/Normal/ of a VisA object, or good/ of a plain "
        "folder (good/ plus one folder per defect type)"
    )
    return (
        "no good test images: image AUROC, F1-max and the false-reject rate need some (the catch rate at the "
        f"threshold is still measured); hold out some good photos that the model was not fitted on and {where}"
    )


def pixel_metrics(pixel: metrics.PixelMetrics | None) -> dict[str, Any]:
    """Pixel-level metrics from a filled accumulator (all None when ``pixel`` is None).

    Keys: pixel_auroc, pixel_auroc_exact, pixel_f1_max, pixel_f1_threshold, aupro,
    aupro_fpr_limit, _pixel_roc, _pro (thinned curves up to FPR 1 and AUPRO_FPR_LIMIT).
    """
    out: dict[str, Any] = {
        "pixel_auroc": None,
        "pixel_auroc_exact": None,
        "pixel_f1_max": None,
        "pixel_f1_threshold": None,
        "aupro": None,
        "aupro_fpr_limit": AUPRO_FPR_LIMIT,
        "_pixel_roc": None,
        "_pro": None,
    }
    if pixel is None:
        return out
    out["pixel_auroc"] = pixel.auroc()
    out["pixel_auroc_exact"] = pixel.exact
    f1 = pixel.f1_max()
    if f1 is not None:
        out["pixel_f1_max"], out["pixel_f1_threshold"] = f1
    out["aupro"] = pixel.aupro(AUPRO_FPR_LIMIT)
    pro = pixel.pro_curve(AUPRO_FPR_LIMIT)
    if pro is not None:
        out["_pro"] = {"fpr": _thin(pro[0]), "pro": _thin(pro[1])}
    roc = pixel_roc_curve(pixel)
    if roc is not None:
        out["_pixel_roc"] = {"fpr": _thin(roc[0]), "tpr": _thin(roc[1])}
    return out


def pixel_roc_curve(pixel: metrics.PixelMetrics, n_points: int = 2048) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixel ROC curve (fpr, tpr), each (K,), from (0, 0) to (1, 1), at about ``n_points`` thresholds.

    Thresholds are quantiles of the defect-pixel scores plus an even grid over their range, so the
    curve is exact at every threshold it shows. None without defect or good pixels.
    """
    if pixel.n_pos == 0 or pixel.n_neg == 0:
        return None
    # PixelMetrics keeps the sorted defect scores and counts good pixels >= t (exactly, or from its
    # histogram in binned mode); metrics.py has no public ROC method yet, so use those two directly.
    pos, _ = pixel._sorted_pos()
    qs = np.quantile(pos.astype(np.float64), np.linspace(0.0, 1.0, n_points // 2))
    grid = np.linspace(float(pos[0]), float(pos[-1]), n_points // 2)
    thresholds = np.unique(np.r_[qs, grid])[::-1]
    tp = pos.size - np.searchsorted(pos.astype(np.float64), thresholds, side="left")
    fp = pixel._count_neg_at_least(thresholds)
    fpr = np.r_[0.0, np.asarray(fp, dtype=np.float64) / pixel.n_neg, 1.0]
    tpr = np.r_[0.0, tp / pixel.n_pos, 1.0]
    return fpr, tpr


def _thin(values: np.ndarray, n: int = CURVE_POINTS) -> list[float]:
    """At most about ``n`` evenly spaced points of a curve, first and last kept, as a JSON list."""
    values = np.asarray(values, dtype=np.float64)
    if values.size > n:
        idx = np.unique(np.r_[np.linspace(0, values.size - 1, n).round().astype(np.int64), values.size - 1])
        values = values[idx]
    return [float(v) for v in values]


def _write_heatmap(
    folder: Path,
    sample: Sample,
    amap: np.ndarray,
    pixel_threshold: float,
    verdict: Any,
    index: int,
    roi: np.ndarray | None = None,
) -> str | None:
    """The full-size picture (photo | overlay, legend) of one test image; its path, or None if it failed."""
    from ..data.images import load_image
    from ..report.heatmaps import heatmap_name, overlay, save_png

    path = folder / sample.defect_type / heatmap_name(Path(sample.path), index)
    try:
        image = load_image(sample.path)
        gt = load_mask(sample.mask_path) if sample.mask_path is not None else None
        save_png(path, overlay(image, amap, pixel_threshold, verdict=verdict, gt_mask=gt, side_by_side=True, roi=roi))
    except Exception as exc:
        log.warning("no heatmap for %s: %s", sample.path, exc)
        return None
    return str(path)


def _fit_within(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` shrunk (area interpolation) so that its longest side is at most ``max_side``."""
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _write_overlay(
    folder: Path,
    sample: Sample,
    amap: np.ndarray,
    pixel_threshold: float,
    verdict: Any,
    index: int,
    max_side: int,
    roi: np.ndarray | None = None,
) -> str | None:
    """A small overlay PNG for a report; returns its path relative to ``folder`` (None on failure)."""
    from ..data.images import load_image
    from ..report.heatmaps import heatmap_name, overlay, save_png

    try:
        image = load_image(sample.path)
        gt = load_mask(sample.mask_path) if sample.mask_path is not None else None
        picture = overlay(
            _fit_within(image, max(max_side, 320)), amap, pixel_threshold, verdict=verdict, gt_mask=gt, roi=roi
        )
        rel = Path(sample.defect_type) / heatmap_name(Path(sample.path), index)
        save_png(folder / rel, _fit_within(picture, max_side))
    except Exception as exc:
        log.warning("no overlay for %s: %s", sample.path, exc)
        return None
    return rel.as_posix()


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _pct(value: float) -> str:
    """A rate as a percentage with at most one decimal: 0.005 -> "0.5 %", 0.01 -> "1 %"."""
    return f"{value * 100:.1f}".rstrip("0").rstrip(".") + " %"


def _count_rate(part: dict[str, Any]) -> str:
    """``k/n  rate % [low, high]`` of an operating-point count, in percent; "-" when n is 0."""
    if not part["n"]:
        return "-"
    low, high = part["ci"]
    return f"{part['count']}/{part['n']}".rjust(9) + f" {part['rate'] * 100:5.1f} % [{low * 100:.1f}, {high * 100:.1f}]"


def format_operating_points(op: dict[str, Any] | None) -> list[str]:
    """The operating-point table of :func:`defectscope.evaluation.operating.operating_points` as
    text lines: the catch rate at each false-reject rate (with the threshold it needs), both rates at
    the model's threshold, the resolution when there are few good images, and a row per defect type.
    Rates in percent with their 95 % Clopper-Pearson intervals."""
    if not op:
        return []
    lines = [
        "operating points (false-reject rate: good images judged defective; catch rate: defective images judged "
        "defective; 95 % intervals)",
        f"  {'false-reject rate':<17} {'threshold':<11} {'good rejected':>15}{'':<16} {'defective caught':>18}",
    ]
    at = op.get("at_threshold")
    rows = [(f"at most {_pct(r['target'])}", r) for r in op["at_false_reject"]]
    rows += [("model threshold", at)] if at is not None else []
    for title, row in rows:
        good = _count_rate(row["false_reject"]) if op["n_good"] else "       no good images"
        caught = _count_rate(row["catch"]) if op["n_defective"] else "  no defective images"
        lines.append(f"  {title:<17} {row['threshold']:<11.6g} {good:<31} {caught}")
    n_good, resolution = op["n_good"], op.get("resolution")
    if resolution is not None:
        below = [row["target"] for row in op["at_false_reject"] if row["target"] < resolution - 1e-12]
        if below:
            named = ", ".join(_pct(t) for t in below)
            which = f"the rows at {named} all mean" if len(below) > 1 else f"the row at {named} means"
            lines.append(
                f"  resolution: with {n_good} good images one false reject is {_pct(resolution)}, so {which} none of "
                "them rejected"
            )
    if op["per_type"]:
        heads = [f"@{_pct(r['target'])}".replace(" ", "") for r in op["at_false_reject"]]
        heads += ["@threshold"] if at is not None else []
        width = max(len("catch rate % by type"), *(len(name) for name in op["per_type"]))
        lines.append(f"  {'catch rate % by type':<{width}} {'n':>5}" + "".join(f"{h:>11}" for h in heads))
        for name, d in op["per_type"].items():
            values = list(d["catch_at_false_reject"])
            values += [d["at_threshold"]["rate"]] if d.get("at_threshold") is not None else []
            lines.append(f"  {name:<{width}} {d['n']:>5}" + "".join(f"{v * 100:>11.1f}" for v in values))
    return lines


def format_summary(result: dict[str, Any]) -> str:
    """The human-readable evaluation summary (the operating-point table included)."""
    reasons = result.get("null_reasons") or {}

    def why(key: str) -> str:
        return f" ({reasons[key]})" if result.get(key) is None and key in reasons else ""

    lines = [
        f"dataset           {result['dataset']}",
        f"method            {result['method']} ({result['backbone']}, {','.join(result['layers'])})",
        f"image_auroc       {_fmt(result['image_auroc'])}{why('image_auroc')}",
        *(
            [f"image_auroc_map   {_fmt(result['image_auroc_map_max'])} (from each map's maximum, --protocol mvtec)"]
            if "image_auroc_map_max" in result
            else []
        ),
        f"pixel_auroc       {_fmt(result['pixel_auroc'])}",
        f"aupro             {_fmt(result.get('aupro'))}",
        f"n_good            {result['n_good']}",
        f"n_defective       {result['n_defective']}",
        f"n_failed          {result['n_failed']}",
        f"images_per_second {result['images_per_second']}",
    ]
    alignment = result.get("alignment")
    if alignment:
        lines.append(f"alignment         {alignment['mode']}: {alignment['n_unaligned']} image(s) scored unaligned")
        lines.extend(f"  unaligned       {path}" for path in alignment["unaligned"])
    c = result.get("confusion")
    if c:
        lines.append(f"at threshold {result['threshold']:.6g}: tp {c['tp']}  fp {c['fp']}  tn {c['tn']}  fn {c['fn']}")
    lines.extend(format_operating_points(result.get("operating_points")))
    return "\n".join(lines)
