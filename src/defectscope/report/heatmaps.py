"""Heatmap overlays: the anomaly map drawn on the photo the user gave, with the verdict beside it.

The picture must never contradict the verdict. Colours and outlines are measured against the
model's **pixel threshold** (learned from good training images, on the anomaly map's own scale),
not the image threshold (the image score's scale, which for SPADE is not the map's). An image
judged defective always shows where: the region above the pixel threshold, or, when no pixel
reaches it (PatchCore's re-weighted image score can pass its threshold while the smoothed map
stays below the pixel one), its most anomalous region in yellow. An image judged good gets no
outline. Each picture carries a legend: score, threshold, verdict and the colour scale. A model
with a region of interest judges nothing outside it: that part of the photo is drawn dimmed, without
colour, the region's border in grey.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: pictures whose longest side is below this are enlarged (nearest neighbour) for display
MIN_SIDE = 128
#: the legend strip is at least this wide (pixels); narrower pictures get a white margin
LEGEND_WIDTH = 240
#: share of the map's maximum that bounds the "most anomalous region" drawn when nothing passes the pixel threshold
PEAK_SHARE = 0.9
#: brightness kept outside a region of interest (the photo, without the map's colour)
DIM = 0.35
_WHITE, _YELLOW, _MAGENTA, _GREY = (255, 255, 255), (255, 220, 0), (255, 0, 255), (170, 170, 170)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map -> (H, W) float32 map, bilinear."""
    h, w = size
    return cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass
class Verdict:
    """What the legend states: the image score, the image threshold and the judgement (0 good, 1 defective)."""

    score: float
    threshold: float
    judgement: int


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    pixel_threshold: float,
    *,
    verdict: Verdict | None = None,
    alpha: float = 0.45,
    gt_mask: np.ndarray | None = None,
    side_by_side: bool = False,
    legend: bool = True,
    roi: np.ndarray | None = None,
) -> np.ndarray:
    """An (H', W', 3) uint8 picture of the (S, S) anomaly map over the (H, W, 3) uint8 RGB photo.

    Colour scale (jet): 0 blue, the pixel threshold in the middle (green), twice it and above red,
    so one colour means the same on every image of a model. Outlines: white around the pixels at
    or above ``pixel_threshold`` when the image is judged defective (or when no ``verdict`` is
    given); yellow around the most anomalous region (>= 90 % of the map's maximum) when an image
    judged defective has no pixel above it; none on an image judged good. A ground-truth mask is
    outlined in magenta. ``roi``: the model's region of interest over the photo, any (h, w) grid
    (bool, or 0/1): outside it the photo is dimmed to :data:`DIM` of its brightness without colour,
    and the region's border is drawn in grey. ``side_by_side`` puts the photo left of the overlay;
    ``legend`` adds a strip below with the verdict and the colour scale.
    """
    h, w = image.shape[:2]
    if max(h, w) < MIN_SIDE:  # a thumbnail or a 1x1 file: enlarge the picture (not the data) to see it
        scale = MIN_SIDE / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST)
        if gt_mask is not None:
            gt_mask = cv2.resize(gt_mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    full = resize_map(amap, (h, w))
    scale = 2.0 * pixel_threshold if pixel_threshold > 0 else max(float(full.max()), 1e-12)
    level = np.clip(full / scale, 0.0, 1.0)
    colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = np.ascontiguousarray(
        (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    )
    thickness = max(1, round(max(h, w) / 300))
    inside = None if roi is None else resize_map(np.asarray(roi, dtype=np.float32), (h, w)) >= 0.5
    if inside is not None and not inside.all():  # a region covering the whole photo leaves it as it is
        out[~inside] = (image[~inside].astype(np.float32) * DIM).astype(np.uint8)
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, _GREY, thickness)
    region, colour_of_region = regions(full, pixel_threshold, verdict.judgement if verdict is not None else None)
    if region is not None:
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour_of_region, thickness)
    if gt_mask is not None:
        gt = cv2.resize(gt_mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, _MAGENTA, thickness)
    if side_by_side:
        gap = np.full((h, max(2, w // 100), 3), 255, np.uint8)
        out = np.concatenate([image.astype(np.uint8), gap, out], axis=1)
    if legend:
        if out.shape[1] < LEGEND_WIDTH:  # a narrow picture: white margin so the legend fits beside nothing
            margin = np.full((out.shape[0], LEGEND_WIDTH - out.shape[1], 3), 255, np.uint8)
            out = np.concatenate([out, margin], axis=1)
        out = np.concatenate(
            [
                out,
                _legend(
                    out.shape[1],
                    pixel_threshold,
                    verdict,
                    region is not None and colour_of_region == _YELLOW,
                    gt_mask is not None,
                    inside is not None and not inside.all(),
                ),
            ],
            axis=0,
        )
    return out


def regions(full: np.ndarray, pixel_threshold: float, judgement: int | None) -> tuple[np.ndarray | None, tuple]:
    """The bool region to outline on an (H, W) map and its colour (see :func:`overlay`), or (None, ())."""
    if judgement == 0:
        return None, ()
    above = full >= pixel_threshold
    if above.any() or judgement is None:
        return above, _WHITE
    peak = float(full.max())
    candidates = (full >= PEAK_SHARE * peak if peak > 0 else full >= peak).astype(np.uint8)
    _, labels = cv2.connectedComponents(candidates)
    y, x = np.unravel_index(int(np.argmax(full)), full.shape)
    return labels == labels[y, x], _YELLOW


def _legend(
    width: int,
    pixel_threshold: float,
    verdict: Verdict | None,
    peak_only: bool,
    ground_truth: bool = False,
    roi: bool = False,
) -> np.ndarray:
    """A white strip: verdict line, colour bar from 0 to 2x the pixel threshold, what the outlines mean."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    size = max(0.35, min(1.2, width / 900))
    line = int(30 * size) + 6
    strip = np.full((line * 3 + 8, width, 3), 255, np.uint8)
    if verdict is not None:
        word = "DEFECTIVE" if verdict.judgement else "good"
        text = (
            f"{word}: score {verdict.score:.4g} {'>=' if verdict.judgement else '<'} threshold {verdict.threshold:.4g}"
        )
        cv2.putText(
            strip,
            text,
            (6, line - 6),
            font,
            size,
            (200, 0, 0) if verdict.judgement else (0, 120, 0),
            max(1, round(size * 2)),
            cv2.LINE_AA,
        )
    bar_w = max(10, width - 12)
    ramp = cv2.applyColorMap(np.linspace(0, 255, bar_w).astype(np.uint8)[None, :], cv2.COLORMAP_JET)[..., ::-1]
    top = line + 2
    strip[top : top + line // 2, 6 : 6 + bar_w] = np.repeat(ramp, line // 2, axis=0)
    mid = 6 + bar_w // 2
    cv2.line(strip, (mid, top - 2), (mid, top + line // 2 + 2), (0, 0, 0), 1)
    small = size * 0.8
    y = top + line // 2 + int(22 * small)
    cv2.putText(strip, "0", (6, y), font, small, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(
        strip,
        f"pixel thr {pixel_threshold:.4g}",
        (max(6, mid - int(80 * small)), y),
        font,
        small,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    right = f"{2 * pixel_threshold:.4g}"
    cv2.putText(
        strip, right, (max(6, 6 + bar_w - int(18 * small * len(right))), y), font, small, (0, 0, 0), 1, cv2.LINE_AA
    )
    if verdict is not None and not verdict.judgement:
        note = "judged good: nothing outlined"
    elif peak_only:
        note = "yellow: most anomalous region (no pixel above the pixel threshold)"
    else:
        note = "white: above the pixel threshold"
    if ground_truth:
        note += "; magenta: ground truth"
    if roi:
        note += "; dimmed: not judged (outside the region)"
    cv2.putText(strip, note, (6, line * 3 + 2), font, small, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def save_png(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) RGB uint8 image as PNG, creating folders as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise OSError(f"{path}: could not write PNG")


def heatmap_name(image_path: Path, index: int) -> str:
    """A unique, readable file name for an image's overlay."""
    return f"{index:05d}_{image_path.stem}_heatmap.png"
