"""Synthetic rotated parts: one asymmetric textured part photographed at random angles, with defects.

The part is an L-shaped plate with a round hole and a notch (no rotational symmetry), printed
with a fixed random pattern of dots and strokes (so it has keypoints), on a plain grey
background. Every photo turns the part by a random angle about its centre and shifts it a
little. Defects (a red spot or a dark scratch) are drawn on the part before it is turned, so
each ground-truth mask lies on the defect in the photo's own frame. Deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

TEMPLATE = 160
"""Side of the square part template (pixels)."""

BACKGROUND = (70, 74, 78)


def part_template(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(T, T, 3) uint8 textured part and its (T, T) bool silhouette, T = TEMPLATE."""
    rng = np.random.default_rng(seed)
    t = TEMPLATE
    shape = np.zeros((t, t), np.uint8)
    poly = np.array([[30, 28], [128, 28], [128, 70], [78, 70], [78, 132], [30, 132]], np.int32)  # an "L"
    cv2.fillPoly(shape, [poly], 255)
    cv2.circle(shape, (54, 52), 10, 0, -1)  # a hole near one corner
    cv2.rectangle(shape, (30, 96), (42, 108), 0, -1)  # a notch on one edge
    base = np.empty((t, t, 3), np.float64)
    base[:] = (188, 176, 150)
    canvas = base.copy()
    for _ in range(70):  # fixed printed pattern: dots and strokes
        x, y = rng.integers(25, t - 25, size=2)
        colour = rng.integers(20, 120, size=3).astype(np.float64)
        if rng.random() < 0.5:
            cv2.circle(canvas, (int(x), int(y)), int(rng.integers(2, 5)), colour.tolist(), -1)
        else:
            dx, dy = rng.integers(-12, 13, size=2)
            cv2.line(canvas, (int(x), int(y)), (int(x + dx), int(y + dy)), colour.tolist(), 2)
    silhouette = shape > 0
    part = np.clip(canvas, 0, 255).astype(np.uint8)
    return part, silhouette


def draw_defect(
    part: np.ndarray, silhouette: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a ``spot`` or ``scratch`` on the part (inside its silhouette); return (part, bool mask)."""
    part = part.copy()
    mask = np.zeros(silhouette.shape, np.uint8)
    inside = np.argwhere(cv2.erode(silhouette.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0)
    y, x = inside[rng.integers(len(inside))]
    if kind == "spot":
        r = int(rng.integers(7, 10))
        cv2.circle(part, (int(x), int(y)), r, (200, 30, 30), -1)
        cv2.circle(mask, (int(x), int(y)), r, 255, -1)
    elif kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(18, 26)
        p0 = (int(x - length / 2 * np.cos(angle)), int(y - length / 2 * np.sin(angle)))
        p1 = (int(x + length / 2 * np.cos(angle)), int(y + length / 2 * np.sin(angle)))
        cv2.line(part, p0, p1, (25, 25, 60), 4)
        cv2.line(mask, p0, p1, 255, 4)
    else:
        raise ValueError(f"unknown defect {kind!r}")
    keep = (mask > 0) & silhouette
    return part, keep


def photograph(
    part: np.ndarray,
    silhouette: np.ndarray,
    angle: float,
    shift: tuple[float, float],
    size: int,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place the part turned by ``angle`` degrees (cv2 convention) and shifted, on a size x size background.

    Returns (image (size, size, 3) uint8, defect mask (size, size) bool, matrix (2, 3) template -> photo).
    """
    t = part.shape[0]
    matrix = cv2.getRotationMatrix2D(((t - 1) / 2, (t - 1) / 2), angle, 1.0)
    matrix[:, 2] += np.array([(size - t) / 2 + shift[0], (size - t) / 2 + shift[1]])
    warped = cv2.warpAffine(part, matrix, (size, size), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(silhouette.astype(np.float32), matrix, (size, size), flags=cv2.INTER_LINEAR)[..., None]
    background = np.empty((size, size, 3), np.float64)
    background[:] = BACKGROUND
    image = alpha * warped + (1 - alpha) * background + rng.normal(0, 2.0, size=(size, size, 3))
    out_mask = np.zeros((size, size), bool)
    if mask is not None:
        out_mask = cv2.warpAffine(mask.astype(np.uint8) * 255, matrix, (size, size), flags=cv2.INTER_NEAREST) > 127
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), out_mask, matrix


def make_rotated_category(
    root: Path,
    name: str = "rotated",
    n_train: int = 20,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 192,
    seed: int = 0,
    max_shift: float = 6.0,
) -> Path:
    """Write an MVTec AD-layout category of the part at random angles; returns its folder.

    The first training image shows the part unturned (angle 0), the others any angle in [0, 360).
    """
    folder = Path(root) / name
    rng = np.random.default_rng(seed)
    part, silhouette = part_template(seed)

    def shot(i: int) -> tuple[float, tuple[float, float]]:
        angle = 0.0 if i < 0 else float(rng.uniform(0, 360))
        return angle, (float(rng.uniform(-max_shift, max_shift)), float(rng.uniform(-max_shift, max_shift)))

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        angle, shift = shot(-1 if i == 0 else i)
        save(photograph(part, silhouette, angle, shift, size, rng)[0], folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        angle, shift = shot(i)
        save(photograph(part, silhouette, angle, shift, size, rng)[0], folder / "test" / "good" / f"{i:03d}.png")
    kinds = ["spot", "scratch"]
    for i in range(n_test_defect):
        kind = kinds[i % 2]
        damaged, mask = draw_defect(part, silhouette, kind, rng)
        angle, shift = shot(i)
        image, photo_mask, _ = photograph(damaged, silhouette, angle, shift, size, rng, mask=mask)
        save(image, folder / "test" / kind / f"{i:03d}.png")
        save(photo_mask.astype(np.uint8) * 255, folder / "ground_truth" / kind / f"{i:03d}_mask.png")
    return folder


if __name__ == "__main__":  # python tests/rotated.py OUT_DIR [seed]
    import sys

    print(
        make_rotated_category(
            Path(sys.argv[1]),
            n_train=30,
            n_test_good=15,
            n_test_defect=15,
            size=192,
            seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0,
        )
    )
