"""Nearest-neighbour indexes (exact flat, HNSW, IVF) on a real PatchCore bank and a large synthetic one.

    python benchmarks/bench_knn.py                          # bottle only
    python benchmarks/bench_knn.py --large 1000000          # bottle + a 1M x 152 synthetic bank
    python benchmarks/bench_knn.py --no-bottle --large 300000

Bottle: fit PatchCore (default parameters, 10 % coreset unless --coreset-ratio) on MVTec AD bottle
train/good, take the test images' patch features as queries and, per index, print the build
seconds, queries/s for k=1, recall@1 against the exact flat index, the relative error of the
nearest-neighbour distance ((d - d_exact) / d_exact, max and mean), and the detector's image and
pixel AUROC with its index replaced by that one.
Large: a seeded random clustered bank (N x 152, sqrt(N) Gaussian clusters) and queries near its
entries: build seconds, queries/s, recall@1 and distance error, to show where the approximate
indexes pay off.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from machine import BOTTLE, hardware_line, peak_rss_mib

INDEX_KINDS = ("flat", "hnsw", "ivf")


def search_stats(nn: object, queries: torch.Tensor, exact: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Queries/s for k=1, and recall@1 / relative distance error against ``exact`` (distances, indices)."""
    t0 = time.perf_counter()
    dist, idx = nn.search(queries, 1)  # type: ignore[attr-defined]
    s = time.perf_counter() - t0
    out = {"qps": queries.shape[0] / s, "dist": dist, "idx": idx}
    if exact is not None:
        d0, i0 = exact[0][:, 0].double(), exact[1][:, 0]
        rel = (dist[:, 0].double() - d0) / d0.clamp_min(1e-12)
        out.update(
            recall=float((idx[:, 0] == i0).double().mean()),
            rel_max=float(rel.max()),
            rel_mean=float(rel.mean()),
            worse=int((rel > 0.5).sum()),
        )
    return out


def row(name: str, build_s: float, st: dict, extra: str = "") -> str:
    rec = f"{st['recall']:.4f}" if "recall" in st else "1 (exact)"
    err = f"{st['rel_max']:.3g} / {st['rel_mean']:.2g}" if "rel_max" in st else "0 / 0"
    worse = str(st.get("worse", 0))
    return f"| {name} | {build_s:.2f} | {st['qps']:,.0f} | {rec} | {err} | {worse} |{extra}"


def run_bottle(args: argparse.Namespace) -> None:
    from defectscope.components.knn import NearestNeighbors
    from defectscope.data.images import load_image, load_mask, preprocess
    from defectscope.data.layouts import mvtec_category
    from defectscope.detectors.patchcore import PatchCore
    from defectscope.evaluation.metrics import PixelMetrics, image_auroc
    from defectscope.fitting import fit_detector

    split = mvtec_category(BOTTLE)
    det = PatchCore(image_size=args.image_size, coreset_ratio=args.coreset_ratio, seed=0)
    det.extractor
    t0 = time.perf_counter()
    fit_detector(det, split.train, batch_size=args.batch_size)
    bank, groups = det.memory_bank_, det.bank_image_
    print(
        f"bottle: fit {time.perf_counter() - t0:.1f} s on {len(split.train)} images, coreset ratio "
        f"{args.coreset_ratio}, bank {tuple(bank.shape)}",
        flush=True,
    )

    size = det.image_size
    mean, std = det.input_stats
    images = torch.stack([preprocess(load_image(s.path), size, mean, std) for s in split.test])
    labels = np.array([s.label for s in split.test])
    masks = np.stack(
        [
            load_mask(s.mask_path, (size, size)) if s.mask_path is not None else np.zeros((size, size), bool)
            for s in split.test
        ]
    )
    with torch.inference_mode():
        feats = torch.cat(
            [det._patch_features(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
        )
    queries = feats.reshape(-1, feats.shape[-1]).contiguous()
    print(
        f"queries: {queries.shape[0]} patch features of {len(images)} test images ({int(labels.sum())} defective)",
        flush=True,
    )

    print(
        "\n| index | build s | queries/s (k=1) | recall@1 | rel. dist. error max / mean | queries > 1.5x | "
        "image AUROC | pixel AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    exact = None
    for kind in INDEX_KINDS:
        t0 = time.perf_counter()
        nn = NearestNeighbors(bank, groups=groups, index=kind)
        build_s = time.perf_counter() - t0
        st = search_stats(nn, queries, exact)
        if kind == "flat":
            exact = (st["dist"], st["idx"])
        det._index = nn
        pred = det.predict([images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)])
        pixel = PixelMetrics()
        pixel.add(pred.maps, masks)
        name = kind + _params(nn)
        print(row(name, build_s, st, f" {image_auroc(labels, pred.scores):.4f} | {pixel.auroc():.4f} |"), flush=True)
    det._index = None


def _params(nn: object) -> str:
    if nn.index == "hnsw":  # type: ignore[attr-defined]
        return f" (M={nn.hnsw_m}, efC={nn.ef_construction}, efS={nn.ef_search})"  # type: ignore[attr-defined]
    if nn.index == "ivf":  # type: ignore[attr-defined]
        return f" (nlist={nn.nlist}, nprobe={nn.nprobe})"  # type: ignore[attr-defined]
    return ""


def clustered_bank(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float32: sqrt(n) Gaussian clusters (centres spread 3, unit noise), built in chunks."""
    g = torch.Generator().manual_seed(seed)
    n_centres = max(1, int(n**0.5))
    centres = torch.randn(n_centres, d, generator=g) * 3.0
    out = torch.empty(n, d)
    for lo in range(0, n, 1 << 16):
        hi = min(n, lo + (1 << 16))
        out[lo:hi] = centres[torch.randint(0, n_centres, (hi - lo,), generator=g)]
        out[lo:hi] += torch.randn(hi - lo, d, generator=g)
    return out


def run_large(args: argparse.Namespace) -> None:
    from defectscope.components.knn import NearestNeighbors

    n, d = args.large, 152
    bank = clustered_bank(n, d, seed=0)
    g = torch.Generator().manual_seed(1)
    queries = bank[torch.randint(0, n, (args.large_queries,), generator=g)] + 0.5 * torch.randn(
        args.large_queries, d, generator=g
    )
    print(f"\nsynthetic bank {n} x {d} ({int(n**0.5)} clusters), {args.large_queries} queries near its entries:")
    print("\n| index | build s | queries/s (k=1) | recall@1 | rel. dist. error max / mean | queries > 1.5x |")
    print("|---|---|---|---|---|---|", flush=True)
    exact = None
    for kind in INDEX_KINDS:
        t0 = time.perf_counter()
        nn = NearestNeighbors(bank, index=kind)
        build_s = time.perf_counter() - t0
        st = search_stats(nn, queries, exact)
        if kind == "flat":
            exact = (st["dist"], st["idx"])
        print(row(kind + _params(nn), build_s, st), flush=True)
        del nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--large", type=int, default=0, help="also a synthetic bank of this many entries (0: skip)")
    p.add_argument("--large-queries", type=int, default=2000)
    p.add_argument("--no-bottle", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(hardware_line(), flush=True)
    if not args.no_bottle:
        if BOTTLE.is_dir():
            run_bottle(args)
        else:
            print(f"skipping bottle: {BOTTLE} not found (set DEFECTSCOPE_SHARED_DATA)", flush=True)
    if args.large:
        run_large(args)
    print(f"\npeak RSS: {peak_rss_mib():.0f} MiB; {hardware_line().split('load ')[1]}", flush=True)


if __name__ == "__main__":
    main()
