"""Heatmap overlays: the anomaly map drawn on the photo the user gave."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) map -> (H, W) float32 map, bilinear."""
    h, w = size
    return cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    threshold: float,
    *,
    alpha: float = 0.45,
    gt_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a jet-coloured anomaly map onto an (H, W, 3) uint8 RGB image.

    Colour scale: 0 is blue, the threshold sits in the middle (green), twice the threshold and
    above is red, so one colour means the same thing on every image of a model. The region above
    the threshold is outlined in white; a ground-truth mask, if given, is outlined in magenta.
    """
    h, w = image.shape[:2]
    full = resize_map(amap, (h, w))
    scale = 2.0 * threshold if threshold > 0 else max(float(full.max()), 1e-12)
    level = np.clip(full / scale, 0.0, 1.0)
    colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    out = (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    thickness = max(1, round(max(h, w) / 300))
    predicted = (full > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(predicted, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(out)
    cv2.drawContours(out, contours, -1, (255, 255, 255), thickness)
    if gt_mask is not None:
        gt = cv2.resize(gt_mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 0, 255), thickness)
    return out


def save_png(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) RGB uint8 image as PNG, creating folders as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise OSError(f"{path}: could not write PNG")


def heatmap_name(image_path: Path, index: int) -> str:
    """A unique, readable file name for an image's overlay."""
    return f"{index:05d}_{image_path.stem}_heatmap.png"
