"""Fit and predict speed, peak memory and accuracy of PaDiM and SPADE on MVTec AD bottle; prints numbers.

Each method runs in its own child process (so the peak RSS is that method's), with
``torch.set_num_threads(--threads)`` (default 2). Images are decoded and resized once before
timing, so the fit time splits exactly into backbone extraction (time inside the feature
extractor) and statistics (everything else in ``fit``), plus the model-file save. Predict is
repeated ``--repeat`` times over the test images; best and median are printed. Asserts nothing.

    python benchmarks/bench_methods.py --data ../shared/data/mvtec_ad/bottle --repeat 3
    python benchmarks/bench_methods.py --methods padim --scaling 200 800 1500

``--scaling`` instead fits each method on that many ELPV good cells (``defectscope.data.elpv``,
repeated when there are fewer), streamed from the files as ``defectscope fit`` does, each size in
a fresh process, and prints fit seconds and peak RSS (before fit = the process with the backbone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import BOTTLE, child_result, current_rss_mib, elpv_paths, hardware_line, peak_rss_mib

DEFAULT_DATA = str(BOTTLE)


class TimedExtractor:
    """Wraps a FeatureExtractor and adds up the seconds spent in its forward passes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        out = self.inner(x)
        self.seconds += time.perf_counter() - start
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def load_split(data: Path, size: int, mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Train images (N, 3, S, S), test images, test labels (M,) and masks (M, S, S) at the model's size."""
    from defectscope.data.images import load_image, load_mask, preprocess
    from defectscope.data.layouts import load_category

    split = load_category(data)
    train = torch.stack([preprocess(load_image(p), size, mean, std) for p in split.train])
    test = torch.stack([preprocess(load_image(s.path), size, mean, std) for s in split.test])
    labels = np.array([s.label for s in split.test])
    masks = np.stack(
        [load_mask(s.mask_path, size=(size, size)) if s.mask_path else np.zeros((size, size), bool) for s in split.test]
    )
    return train, test, labels, masks


def run_one(method: str, data: Path, threads: int, repeat: int, batch_size: int) -> dict[str, Any]:
    """Fit, save and predict one method with its defaults; returns the measurements."""
    from defectscope.detectors import make_detector
    from defectscope.evaluation import metrics
    from defectscope.io import save_model

    torch.set_num_threads(threads)
    det = make_detector(method)
    timed = TimedExtractor(det.extractor)
    det.set_extractor(timed)  # type: ignore[arg-type]
    start = time.perf_counter()
    train, test, labels, masks = load_split(data, det.image_size, *det.input_stats)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    det.fit(train.split(batch_size))
    fit_s = time.perf_counter() - start
    extraction_s = timed.seconds
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = save_model(Path(tmp) / "m.dsmodel", det, {"threshold": 0.0})
        save_s = time.perf_counter() - start
        model_mib = path.stat().st_size / 2**20

    times: list[float] = []
    pred = None
    for _ in range(repeat):
        start = time.perf_counter()
        pred = det.predict(test.split(batch_size))
        times.append(time.perf_counter() - start)
    assert pred is not None
    pixel = metrics.PixelMetrics()
    pixel.add(pred.maps, masks)
    n = len(test)
    return {
        "method": method,
        "params": {k: v for k, v in det.get_params().items() if k not in ("weights",)},
        "load_s": load_s,
        "fit_s": fit_s,
        "extraction_s": extraction_s,
        "statistics_s": fit_s - extraction_s,
        "save_s": save_s,
        "model_mib": model_mib,
        "predict_best_img_s": n / min(times),
        "predict_median_img_s": n / statistics.median(times),
        "predict_runs_s": times,
        "n_train": len(train),
        "n_test": n,
        "peak_rss_mib": peak_rss_mib(),
        "image_auroc": metrics.image_auroc(labels, pred.scores),
        "pixel_auroc": pixel.auroc(),
    }


def scale_one(method: str, n_images: int, threads: int, batch_size: int) -> dict[str, Any]:
    """Fit ``method`` with its defaults on ``n_images`` ELPV cells from the files; returns seconds and memory."""
    from defectscope.detectors import make_detector
    from defectscope.fitting import fit_detector

    torch.set_num_threads(threads)
    det = make_detector(method)
    det.extractor  # load the backbone before measuring
    before = current_rss_mib()
    start = time.perf_counter()
    fit_detector(det, elpv_paths(n_images), batch_size=batch_size)
    return {"fit_s": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "before_fit_mib": before}


def run_scaling(args: argparse.Namespace) -> None:
    print(
        f"{'method':>8s} {'images':>7s} {'fit s':>8s} {'peak RSS MiB':>13s} {'before fit':>11s} {'fit adds':>9s}  load"
    )
    for method in args.methods:
        for n in args.scaling:
            cmd = [
                sys.executable,
                __file__,
                "--scale-one",
                method,
                str(n),
                "--threads",
                str(args.threads),
                "--batch-size",
                str(args.batch_size),
            ]
            r = child_result(cmd)
            if isinstance(r, str):
                print(f"{method:>8s} {n:7d} failed: {r}", flush=True)
                continue
            print(
                f"{method:>8s} {n:7d} {r['fit_s']:8.1f} {r['peak_rss_mib']:13.0f} {r['before_fit_mib']:11.0f} "
                f"{r['peak_rss_mib'] - r['before_fit_mib']:9.0f}  {os.getloadavg()[0]:.2f}",
                flush=True,
            )


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['method']}: {r['params']}")
    print(
        f"  fit {r['fit_s']:.1f} s on {r['n_train']} images = extraction {r['extraction_s']:.1f} s"
        f" + statistics {r['statistics_s']:.1f} s; save {r['save_s']:.2f} s ({r['model_mib']:.0f} MiB);"
        f" image decoding {r['load_s']:.1f} s (not in fit)"
    )
    runs = ", ".join(f"{t:.1f}" for t in r["predict_runs_s"])
    print(
        f"  predict {r['n_test']} images: best {r['predict_best_img_s']:.2f} img/s,"
        f" median {r['predict_median_img_s']:.2f} img/s (runs {runs} s)"
    )
    print(
        f"  peak RSS {r['peak_rss_mib']:.0f} MiB; image AUROC {r['image_auroc']:.4f}, pixel AUROC {r['pixel_auroc']:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="an MVTec AD category folder")
    parser.add_argument("--methods", nargs="+", default=["padim", "spade"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="predict runs (best and median are printed)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--scaling",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="fit on N ELPV good cells (each N in a fresh process): fit seconds and peak RSS",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one method, JSON out
    parser.add_argument("--scale-one", nargs=2, default=None, help=argparse.SUPPRESS)  # child: method, images
    args = parser.parse_args()
    if args.scale_one:
        method, n = args.scale_one
        print(json.dumps(scale_one(method, int(n), args.threads, args.batch_size)))
        return

    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.threads, args.repeat, args.batch_size)))
        return
    torch.set_num_threads(args.threads)
    print(hardware_line())
    if args.scaling:
        run_scaling(args)
        return
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            method,
            "--data",
            str(args.data),
            "--threads",
            str(args.threads),
            "--repeat",
            str(args.repeat),
            "--batch-size",
            str(args.batch_size),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method}: failed\n{out.stderr[-2000:]}")
            continue
        print_row(json.loads(out.stdout.strip().splitlines()[-1]))
    print(hardware_line().replace("hardware:", "after:"))


if __name__ == "__main__":
    main()
