"""Where PatchCore's predict time goes on bottle: backbone, exact search, scoring, decoding; prints numbers.

    python benchmarks/profile_predict.py

Fits the default PatchCore on ../shared/data/mvtec_ad/bottle, decodes the 83 test images once,
then times each stage of predict per batch of 16 (twice): backbone + patch features, the exact
nearest-neighbour search (with its GFLOP/s: 2 x patches x bank entries x dimensions), and the
image score + anomaly map. Decoding and resizing are timed separately, one image at a time, as
the loader thread does them. Asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import BOTTLE, hardware_line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from defectscope.data.images import load_image, preprocess
    from defectscope.data.layouts import mvtec_category
    from defectscope.data.loader import iter_batches
    from defectscope.detectors.patchcore import PatchCore
    from defectscope.fitting import fit_detector

    print(hardware_line(), flush=True)
    split = mvtec_category(BOTTLE)
    det = PatchCore(seed=0)
    fit_detector(det, split.train, batch_size=args.batch_size)
    paths = [s.path for s in split.test]
    mean, std = det.input_stats
    batches = [b.images for b in iter_batches(paths, det.image_size, mean, std, batch_size=args.batch_size)]
    index = det.index  # build it before timing
    bank, dim = det.memory_bank_.shape
    print(f"bank {bank} x {dim}, {len(paths)} test images, batch {args.batch_size}", flush=True)
    for rep in range(2):
        t_feat = t_search = t_rest = 0.0
        n = patches = 0
        with torch.inference_mode():
            for x in batches:
                t0 = time.perf_counter()
                feats = det._patch_features(x)
                t1 = time.perf_counter()
                b, h, w, d = feats.shape
                dist, idx = index.search(feats.reshape(-1, d), 1)
                t2 = time.perf_counter()
                dist, idx = dist[:, 0].reshape(b, h * w), idx[:, 0].reshape(b, h * w)
                det._image_scores(feats.reshape(b, h * w, d), dist, idx, det.memory_bank_, index)
                det._finish_maps(dist.reshape(b, h, w))
                t3 = time.perf_counter()
                t_feat, t_search, t_rest = t_feat + t1 - t0, t_search + t2 - t1, t_rest + t3 - t2
                n += b
                patches += b * h * w
        gflops = 2.0 * patches * bank * dim / t_search / 1e9
        print(
            f"run {rep + 1}: backbone + patch features {1000 * t_feat / n:.1f} ms/image, exact search "
            f"{1000 * t_search / n:.1f} ms/image ({gflops:.0f} GFLOP/s), score + map {1000 * t_rest / n:.1f} ms/image",
            flush=True,
        )
    sample = paths[:40]
    t0 = time.perf_counter()
    images = [load_image(path) for path in sample]
    t1 = time.perf_counter()
    for image in images:
        preprocess(image, det.image_size, mean, std)
    t2 = time.perf_counter()
    print(
        f"decode {1000 * (t1 - t0) / len(sample):.1f} ms/image, resize + normalise "
        f"{1000 * (t2 - t1) / len(sample):.1f} ms/image (loader thread, beside the model)",
        flush=True,
    )
    print(hardware_line(), flush=True)


if __name__ == "__main__":
    main()
