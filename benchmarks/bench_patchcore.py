"""PatchCore end to end on bottle on a 2-core CPU: fit split by stage, predict speed, memory, accuracy.

    python benchmarks/bench_patchcore.py
    python benchmarks/bench_patchcore.py --coreset exact --knn-index ivf

Bottle: fit on ../shared/data/mvtec_ad/bottle train/good (default 10 % coreset, PatchCore's default input: 288 px),
fit seconds split into extraction (decode + backbone + patch features) / coreset / held-out
threshold scores / save; predict images per second end to end from files (decode, resize,
backbone, nearest neighbours, map, score); image and pixel AUROC; peak RSS of the process.
Fit time and memory at 200 / 1,000 / 3,000 images: benchmarks/bench_scaling.py.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from machine import BOTTLE, current_rss_mib, hardware_line, peak_rss_mib

from defectscope.detectors.patchcore import PATCHCORE_IMAGE_SIZE


def fit_once(paths: list[Path], args: argparse.Namespace, ratio: float) -> tuple[object, dict, dict[str, float]]:
    """Fit PatchCore on ``paths``; returns (detector, metadata, stage seconds)."""
    from defectscope.detectors.patchcore import PatchCore
    from defectscope.fitting import fit_detector
    from defectscope.io import save_model

    det = PatchCore(
        image_size=args.image_size,
        coreset_ratio=ratio,
        projection_dim=args.projection_dim,
        coreset=args.coreset,
        knn_index=args.knn_index,
        seed=0,
    )
    det.extractor  # build the backbone before timing (weights are loaded once per process)
    base_rss = current_rss_mib()
    t0 = time.perf_counter()
    meta = fit_detector(det, paths, batch_size=args.batch_size)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "model.safetensors", det, meta)
    save_s = time.perf_counter() - t0
    core = det.fit_timings_["coreset_s"]
    held = det.fit_timings_["threshold_s"]
    stages = {
        "extraction": fit_s - core - held,
        "coreset": core,
        "threshold": held,
        "save": save_s,
        "total": fit_s + save_s,
        "base_rss_mib": base_rss,
        "coverage_radius": det.fit_details_["coverage_radius"],
    }
    return det, meta, stages


def all_patch_radius(det: object, paths: list[Path]) -> float:
    """Largest distance of any training patch to its nearest memory-bank entry (exact search)."""
    from defectscope.data.loader import iter_batches

    worst = 0.0
    mean, std = det.input_stats  # type: ignore[attr-defined]
    with torch.inference_mode():
        for batch in iter_batches(paths, det.image_size, mean, std, batch_size=16):  # type: ignore[attr-defined]
            feats = det._patch_features(batch.images)  # type: ignore[attr-defined]
            dist, _ = det.index.search(feats.reshape(-1, feats.shape[-1]), 1)  # type: ignore[attr-defined]
            worst = max(worst, float(dist.max()))
    return worst


def run_bottle(args: argparse.Namespace) -> None:
    from defectscope.data.layouts import mvtec_category
    from defectscope.evaluation.evaluate import evaluate_detector
    from defectscope.scoring import score_paths

    split = mvtec_category(BOTTLE)
    print(hardware_line(), flush=True)
    print(
        f"bottle: {len(split.train)} training images, {len(split.test)} test images, "
        f"image size {args.image_size}, coreset ratio {args.ratio}, projection_dim {args.projection_dim}, "
        f"coreset {args.coreset}, nearest-neighbour index {args.knn_index}",
        flush=True,
    )
    det, meta, st = fit_once(split.train, args, args.ratio)
    print(
        f"fit: total {st['total']:.1f} s = extraction {st['extraction']:.1f} + coreset {st['coreset']:.1f} "
        f"+ held-out threshold scores {st['threshold']:.1f} + save {st['save']:.2f}  "
        f"(bank {tuple(det.memory_bank_.shape)}; {hardware_line().split('load ')[1]})",
        flush=True,
    )
    d = det.fit_details_
    print(
        f"coreset ({d['coreset']}, {d['n_chunks']} chunks): {d['n_selected']} of {d['n_patches']} patches, coverage "
        f"radius reported {d['coverage_radius']:.4f} ({d['radius_space']} space), measured over all training patches "
        f"{all_patch_radius(det, split.train):.4f}",
        flush=True,
    )
    paths = [s.path for s in split.test]
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        n = sum(1 for r in score_paths(det, paths, meta["threshold"], batch_size=args.batch_size) if r.error is None)
        s = time.perf_counter() - t0
        print(
            f"predict (run {rep + 1}): {n} images in {s:.1f} s = {n / s:.1f} images/s end to end from files "
            f"({hardware_line().split('load ')[1]})",
            flush=True,
        )
    result = evaluate_detector(det, split, meta["threshold"], batch_size=args.batch_size)
    print(f"accuracy: image AUROC {result['image_auroc']:.4f}, pixel AUROC {result.get('pixel_auroc')}", flush=True)
    print(f"peak RSS: {peak_rss_mib():.0f} MiB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.1, help="coreset ratio for bottle")
    p.add_argument(
        "--image-size", type=int, default=PATCHCORE_IMAGE_SIZE, help="model input side (default: PatchCore's)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--projection-dim", type=int, default=None, help="approximate coreset: project to this many dims")
    p.add_argument("--coreset", choices=["folds", "exact"], default="folds", help="coreset selection")
    p.add_argument("--knn-index", choices=["flat", "ivf", "hnsw"], default="flat", help="nearest-neighbour index")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=2, help="predict timing repeats")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run_bottle(args)


if __name__ == "__main__":
    main()
