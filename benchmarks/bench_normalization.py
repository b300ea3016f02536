"""Input normalisation, side by side: the weights' own statistics against ImageNet's; prints a table.

    python benchmarks/bench_normalization.py                  # bottle + ELPV (about 25 minutes on 2 cores)
    python benchmarks/bench_normalization.py --no-elpv        # bottle only

Bottle (MVTec AD, ../shared/data or DEFECTSCOPE_SHARED_DATA): image and pixel AUROC of PatchCore
(1 % and 10 % coreset; 1 % on lite1 and lite2 too), PaDiM and SPADE with their defaults, once per
normalisation. ELPV (pip install elpv-dataset): image AUROC of PatchCore (1 %) and PaDiM on the
demo's split (200 good training cells; 100 held-out good + every defective cell) for mono and poly
cells. Images are decoded once per dataset; each row is fitted from scratch. Asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from machine import BOTTLE, hardware_line

NORMALIZATIONS = ("weights", "imagenet")

# (method, backbone, parameters) rows for bottle and for ELPV
BOTTLE_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("patchcore", "tf_efficientnet_lite0", {"coreset_ratio": 0.01}),
    ("patchcore", "tf_efficientnet_lite0", {}),
    ("patchcore", "tf_efficientnet_lite1", {"coreset_ratio": 0.01}),
    ("patchcore", "tf_efficientnet_lite2", {"coreset_ratio": 0.01}),
    ("padim", "tf_efficientnet_lite0", {}),
    ("spade", "tf_efficientnet_lite0", {}),
]
ELPV_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("patchcore", "tf_efficientnet_lite0", {"coreset_ratio": 0.01}),
    ("padim", "tf_efficientnet_lite0", {}),
]


def evaluate(
    method: str,
    backbone: str,
    params: dict[str, Any],
    normalization: str,
    data: tuple[list[np.ndarray], list[np.ndarray], np.ndarray, list[Any] | None],
) -> tuple[float, float | None]:
    """Fit on the training images and return (image AUROC, pixel AUROC or None without masks)."""
    from defectscope.data.images import load_mask, preprocess
    from defectscope.detectors import make_detector
    from defectscope.evaluation.metrics import PixelMetrics, image_auroc

    train, test, labels, masks = data
    det = make_detector(method, backbone=backbone, normalization=normalization, **params)
    size = det.image_size
    mean, std = det.input_stats

    def batches(images: list[np.ndarray]) -> list[torch.Tensor]:
        return [
            torch.stack([preprocess(im, size, mean, std) for im in images[i : i + 16]])
            for i in range(0, len(images), 16)
        ]

    det.fit(batches(train))
    pixels = PixelMetrics()
    scores: list[float] = []
    for i, batch in enumerate(batches(test)):
        pred = det.predict(batch)
        scores.extend(pred.scores.tolist())
        if masks is not None:
            chunk = masks[i * 16 : (i + 1) * 16]
            pixels.add(
                pred.maps, np.stack([load_mask(m, (size, size)) if m else np.zeros((size, size), bool) for m in chunk])
            )
    return image_auroc(labels, np.array(scores)), (pixels.auroc() if masks is not None else None)


def table(name: str, rows: list[tuple[str, str, dict[str, Any]]], data: Any) -> None:
    print(f"\n{name}\n\n| method | backbone | parameters | weights: image / pixel | imagenet: image / pixel |")
    print("|---|---|---|---|---|")
    for method, backbone, params in rows:
        cells = []
        for norm in NORMALIZATIONS:
            t0 = time.perf_counter()
            image, pixel = evaluate(method, backbone, params, norm, data)
            cells.append(f"{image:.4f} / {'-' if pixel is None else f'{pixel:.4f}'} ({time.perf_counter() - t0:.0f} s)")
        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        print(
            f"| {method} | {backbone.replace('tf_efficientnet_', '')} | {label} | {cells[0]} | {cells[1]} |", flush=True
        )


def main() -> None:
    from defectscope.data.images import load_image
    from defectscope.data.layouts import mvtec_category

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-bottle", action="store_true")
    parser.add_argument("--no-elpv", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(hardware_line(), flush=True)
    if not args.no_bottle:
        if not BOTTLE.is_dir():
            print(f"bottle: skipped ({BOTTLE} not found)")
        else:
            split = mvtec_category(BOTTLE)
            data = (
                [load_image(p) for p in split.train],
                [load_image(s.path) for s in split.test],
                np.array([s.label for s in split.test]),
                [s.mask_path for s in split.test],
            )
            table("MVTec AD bottle (image / pixel AUROC)", BOTTLE_ROWS, data)
    if not args.no_elpv:
        from defectscope.data.elpv import elpv_available, elpv_split

        if not elpv_available():
            print("ELPV: skipped (pip install elpv-dataset)")
            return
        for cell in ("mono", "poly"):
            sp = elpv_split(cell)
            data = (
                [load_image(p) for p in sp.train],
                [load_image(s.path) for s in sp.test],
                np.array([s.label for s in sp.test]),
                None,
            )
            table(
                f"ELPV {cell} (image AUROC; {len(sp.train)} training cells, {len(sp.test)} test cells)", ELPV_ROWS, data
            )


if __name__ == "__main__":
    main()
