"""PatchCore at scale on 2 cores: fit time by stage and memory at 200 / 1,000 / 3,000 images, and the
accuracy and false-reject rate of the default coreset against the exact one on the development suite.

    python benchmarks/bench_scaling.py                         # both parts (about 40 minutes on 2 cores)
    python benchmarks/bench_scaling.py --part scaling --sizes 200 1000 3000
    python benchmarks/bench_scaling.py --part accuracy --sets bottle pill --coresets folds exact

Scaling (each size in a fresh process): PatchCore with its defaults (or --coreset) fitted on N ELPV
cells (all 2,624 cells, labels ignored, then horizontally flipped copies to reach N; the timing does
not depend on labels), printing extraction / coreset / threshold / save seconds, seconds per image,
peak RSS, bank size, the coverage radius the fit reports, the coverage radius of the bank over a
sample of training patches measured by exact search, and predict images/s end to end from files
on the demo's 413 mono test cells.

Accuracy: bottle and pill (../shared/data/mvtec_ad or DEFECTSCOPE_SHARED_DATA) and ELPV mono and
poly (the demo's split: 200 good training cells, 100 good + every defective test cell), each coreset
mode fitted from scratch: image AUROC, pixel AUROC and AUPRO where there are masks, fit seconds, and
the false-reject rate at the model's own threshold on held-out good images (bottle and pill: the
test split's good images; ELPV: every good cell not used for training) with a two-sided 95 %
Clopper-Pearson interval, against the nominal 1 - quantile = 1 %. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import SHARED_DATA, child_result, current_rss_mib, hardware_line, peak_rss_mib
from scipy import stats

SETS = ("bottle", "pill", "elpv-mono", "elpv-poly")


# ----------------------------------------------------------------------------------------- data
def all_elpv_cells() -> list[Path]:
    from defectscope.data.elpv import _data_dir, _read_labels

    data = _data_dir()
    if data is None:
        raise SystemExit("ELPV is not installed: pip install elpv-dataset")
    return [path for path, _, _ in _read_labels(data)]


def scaling_images(n: int, folder: Path) -> list[Path]:
    """``n`` image paths: every ELPV cell, then flipped copies written to ``folder`` as PNGs."""
    from PIL import Image

    cells = all_elpv_cells()
    paths = cells[:n]
    for i in range(max(0, n - len(cells))):
        out = folder / f"flip_{i:05d}.png"
        Image.open(cells[i % len(cells)]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
        paths.append(out)
    return paths


def suite_split(name: str) -> tuple[Any, list[Path]]:
    """(split, extra held-out good images) of one development set."""
    from defectscope.data.layouts import mvtec_category

    if name in ("bottle", "pill"):
        return mvtec_category(SHARED_DATA / "mvtec_ad" / name), []
    from defectscope.data.elpv import elpv_split

    cell = name.split("-")[1]
    split = elpv_split(cell)
    rest = elpv_split(cell, n_train=None, test_good=0)  # every good cell
    used = set(split.train) | {s.path for s in split.test}
    return split, [p for p in rest.train if p not in used]


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


# ----------------------------------------------------------------------------------------- parts
def fit_child(args: argparse.Namespace) -> None:
    """One scaling size in this process; prints one JSON line."""
    from defectscope.data.elpv import elpv_split
    from defectscope.detectors.patchcore import PatchCore
    from defectscope.fitting import fit_detector
    from defectscope.io import load_model, save_model
    from defectscope.scoring import score_paths

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = scaling_images(args.child, Path(tmp))
        det = PatchCore(coreset=args.coreset, **json.loads(args.params))
        det.extractor  # the backbone is built before timing (once per process)
        base_rss = current_rss_mib()
        t0 = time.perf_counter()
        meta = fit_detector(det, paths, batch_size=16)
        fit_s = time.perf_counter() - t0
        model = Path(tmp) / "m.dsmodel"
        t0 = time.perf_counter()
        save_model(model, det, meta)
        save_s = time.perf_counter() - t0
        fit_peak = peak_rss_mib()
        radius = sampled_radius(det, paths, args.radius_sample)
        loaded, meta = load_model(model)
        test = [s.path for s in elpv_split("mono").test]
        list(score_paths(loaded, test[:16], meta["threshold"]))  # warm-up
        t0 = time.perf_counter()
        results = list(score_paths(loaded, test, meta["threshold"]))
        ips = len(results) / (time.perf_counter() - t0)
    timings = det.fit_timings_
    out = {
        "n": args.child,
        "fit_s": fit_s,
        "coreset_s": timings["coreset_s"],
        "threshold_s": timings["threshold_s"],
        "extraction_s": fit_s - timings["coreset_s"] - timings["threshold_s"],
        "save_s": save_s,
        "bank": det.fit_details_["n_selected"],
        "chunks": det.fit_details_["n_chunks"],
        "radius_reported": det.fit_details_["coverage_radius"],
        "radius_sampled": radius,
        "base_rss": base_rss,
        "peak_rss": fit_peak,
        "predict_ips": ips,
        "index": meta["params"]["knn_index"],
    }
    print(json.dumps(out))


def sampled_radius(det: Any, paths: list[Path], n_images: int) -> float:
    """Largest distance from a patch of ``n_images`` evenly spaced training images to its nearest bank entry."""
    from defectscope.components.knn import NearestNeighbors
    from defectscope.data.loader import iter_batches

    chosen = paths[:: max(1, len(paths) // n_images)][:n_images]
    index = NearestNeighbors(det.memory_bank_)
    mean, std = det.input_stats
    worst = 0.0
    with torch.inference_mode():
        for batch in iter_batches(chosen, det.image_size, mean, std, batch_size=16):
            feats = det._patch_features(batch.images)
            dist, _ = index.search(feats.reshape(-1, feats.shape[-1]), 1)
            worst = max(worst, float(dist.max()))
    return worst


def run_scaling(args: argparse.Namespace) -> None:
    from defectscope.detectors.patchcore import PatchCore

    params = json.loads(args.params)
    det = PatchCore(coreset=args.coreset, **params)
    print(
        f"\nscaling: PatchCore defaults{' + ' + args.params if params else ''} (coreset {args.coreset}), "
        f"{det.image_size} px, layer weighting {det.layer_weighting}, {det.backbone}, ELPV cells (flipped copies "
        f"past 2,624), each size in a fresh process; predict on the demo's 413 mono test cells",
        flush=True,
    )
    head = (
        "| images | fit s | extraction | coreset | threshold | save | s/image | peak RSS MiB (before fit) | "
        "bank | chunks | radius reported / sampled | predict img/s |"
    )
    print(head + "\n|" + "---|" * 12, flush=True)
    for n in args.sizes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(n),
            "--coreset",
            args.coreset,
            "--threads",
            str(args.threads),
            "--radius-sample",
            str(args.radius_sample),
            "--params",
            args.params,
        ]
        r = child_result(cmd)
        if isinstance(r, str):
            print(f"| {n} | failed: {r} |", flush=True)
            continue
        total = r["fit_s"] + r["save_s"]
        print(
            f"| {n} | {total:.1f} | {r['extraction_s']:.1f} | {r['coreset_s']:.1f} | {r['threshold_s']:.1f} | "
            f"{r['save_s']:.2f} | {total / n:.3f} | {r['peak_rss']:.0f} ({r['base_rss']:.0f}) | {r['bank']} | "
            f"{r['chunks']} | {r['radius_reported']:.2f} / {r['radius_sampled']:.2f} | {r['predict_ips']:.1f} |",
            flush=True,
        )


def evaluate_set(name: str, coreset: str, params: dict[str, Any]) -> dict[str, Any]:
    from defectscope.data.loader import iter_batches
    from defectscope.detectors.patchcore import PatchCore
    from defectscope.evaluation.evaluate import evaluate_detector
    from defectscope.fitting import fit_detector

    split, extra_good = suite_split(name)
    det = PatchCore(coreset=coreset, **params)
    det.extractor
    t0 = time.perf_counter()
    meta = fit_detector(det, split.train)
    fit_s = time.perf_counter() - t0
    threshold = meta["threshold"]
    res = evaluate_detector(det, split, threshold)
    good = [r["score"] for r in res["images"] if r["label"] == 0]
    mean, std = det.input_stats
    for batch in iter_batches(extra_good, det.image_size, mean, std, batch_size=16):
        good.extend(det.predict(batch.images).scores.tolist())
    rejected = int(sum(s >= threshold for s in good))
    lo, hi = clopper_pearson(rejected, len(good))
    return {
        "set": name,
        "coreset": coreset,
        "image_auroc": res["image_auroc"],
        "pixel_auroc": res.get("pixel_auroc"),
        "aupro": res.get("aupro"),
        "fit_s": fit_s,
        "rejected": rejected,
        "n_good": len(good),
        "frr_lo": lo,
        "frr_hi": hi,
        "bank": det.fit_details_["n_selected"],
        "n_train": len(split.train),
    }


def run_accuracy(args: argparse.Namespace) -> None:
    params = json.loads(args.params)
    print(
        f"\naccuracy: PatchCore defaults{' + ' + args.params if params else ''}, threshold = 0.99 quantile of "
        "held-out training scores (nominal false-reject rate 1 %)",
        flush=True,
    )
    print("| set | coreset | image AUROC | pixel AUROC | AUPRO | fit s | held-out good rejected | rate [95 % CI] |")
    print("|" + "---|" * 8, flush=True)
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for name in args.sets:
        for coreset in args.coresets:
            r = evaluate_set(name, coreset, params)
            print(
                f"| {name} ({r['n_train']} train) | {coreset} | {f(r['image_auroc'])} | {f(r['pixel_auroc'])} | "
                f"{f(r['aupro'])} | {r['fit_s']:.1f} | {r['rejected']} / {r['n_good']} | "
                f"{r['rejected'] / r['n_good']:.1%} [{r['frr_lo']:.1%}, {r['frr_hi']:.1%}] |",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "scaling", "accuracy"], default="all")
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 3000])
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--coresets", nargs="+", choices=["folds", "exact"], default=["folds", "exact"])
    p.add_argument("--coreset", choices=["folds", "exact"], default="folds", help="coreset mode of the scaling run")
    p.add_argument(
        "--params",
        default="{}",
        help="extra PatchCore parameters for both parts, as JSON (the defaults before "
        '288 px was chosen: \'{"image_size": 256, "layer_weighting": "channels"}\')',
    )
    p.add_argument(
        "--radius-sample", type=int, default=20, help="training images whose patches the sampled radius covers"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        fit_child(args)
        return
    torch.set_num_threads(args.threads)
    print(hardware_line(), flush=True)
    if args.part in ("all", "accuracy"):
        run_accuracy(args)
    if args.part in ("all", "scaling"):
        run_scaling(args)


if __name__ == "__main__":
    main()
