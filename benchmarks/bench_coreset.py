"""Speed of greedy k-center coreset selection at PatchCore's realistic size; prints numbers.

Default size: MVTec bottle, 209 training images x 32x32 patches (stride 8 at 256 px) = 214,016
patch features of 152 dims (tf_efficientnet_lite0 blocks.2 + blocks.4), select 1 % (2,140) and
extrapolate to 10 %. Features are synthetic (Gaussian clusters) unless ``--features`` names a
.pt/.npy (N, D) file.

    python benchmarks/bench_coreset.py --n 214016 --d 152 --ratio 0.01 --threads 2
    python benchmarks/bench_coreset.py --features bottle_feats.pt --no-lowp   # real features

"pruned" is the exact triangle-inequality engine (numba); its speed depends on the data's
intrinsic dimension: real bottle features prune well, the synthetic Gaussian clusters hardly.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from defectscope.components.coreset import coverage_radius, greedy_coreset, jl_dim, random_projection


def synthetic(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) non-negative clustered features, roughly like post-ReLU CNN patch features."""
    g = torch.Generator().manual_seed(seed)
    n_clusters = 200
    centres = torch.randn(n_clusters, d, generator=g) * 2.0
    labels = torch.randint(n_clusters, (n,), generator=g)
    x = centres[labels] + torch.randn(n, d, generator=g)
    return x.clamp_min_(0.0)


def greedy_lowp(x: torch.Tensor, n_select: int, start: int, dtype: torch.dtype) -> torch.Tensor:
    """The library's loop with features stored in ``dtype`` (distances still accumulated in float32)."""
    xs = x.to(dtype).contiguous()  # (N, d) row-major: for float16 this layout measured faster
    sq = (xs.float() ** 2).sum(1)
    min_d = torch.full_like(sq, float("inf"))
    dot = torch.empty(x.shape[0], dtype=dtype)
    dist = torch.empty_like(sq)
    sel = torch.empty(n_select, dtype=torch.int64)
    idx = start
    for i in range(n_select):
        sel[i] = idx
        torch.mv(xs, xs[idx], out=dot)
        torch.add(sq, dot, alpha=-2.0, out=dist)
        dist.add_(sq[idx])
        torch.minimum(min_d, dist, out=min_d)
        min_d[idx] = -float("inf")
        idx = int(torch.argmax(min_d))
    return sel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=214_016, help="number of patch features")
    p.add_argument("--d", type=int, default=152, help="feature dimension")
    p.add_argument("--ratio", type=float, default=0.01, help="fraction to select (timed)")
    p.add_argument("--target-ratio", type=float, default=0.10, help="fraction to extrapolate to")
    p.add_argument("--dims", type=int, nargs="*", default=[128, 64, 32], help="projection dims to try")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=str, default=None, help=".pt or .npy (N, D) features instead of synthetic")
    p.add_argument("--no-lowp", action="store_true", help="skip float16/bfloat16 storage variants")
    p.add_argument("--lowp-dims", type=int, nargs="*", default=[0, 64], help="dims for low-precision runs (0 = D)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if args.features:
        x = torch.load(args.features) if args.features.endswith(".pt") else torch.from_numpy(np.load(args.features))
        x = x.float().reshape(x.shape[0], -1)
        source = args.features
    else:
        x = synthetic(args.n, args.d, args.seed)
        source = "synthetic clusters"
    n, d = x.shape
    k = max(1, int(round(n * args.ratio)))
    k_target = int(round(n * args.target_ratio))
    print(
        f"features: {n} x {d} ({source}), {x.numel() * 4 / 2**20:.0f} MiB float32; threads={args.threads}", flush=True
    )
    print(f"select {k} ({args.ratio:.0%}), extrapolate to {k_target} ({args.target_ratio:.0%})", flush=True)
    print(f"jl_dim(N, eps=0.9) = {jl_dim(n, 0.9)}, eps=0.5 -> {jl_dim(n, 0.5)}  (>= D means no projection)", flush=True)

    variants: list[tuple[str, dict]] = [("exact, brute (no projection)", {"eps": None, "engine": "brute"})]
    variants.append(("exact, pruned (no projection)", {"eps": None, "engine": "pruned"}))
    variants.append((f"eps=0.9 (jl dim {jl_dim(n, 0.9)})", {"eps": 0.9}))
    variants += [(f"projection_dim={dim}", {"projection_dim": dim}) for dim in args.dims]

    results: dict[str, float] = {}
    print(
        f"\n{'variant':34s} {'select s':>9s} {'centres/s':>10s} {f'{k_target} est s':>12s} {'radius':>9s} {'vs exact':>9s}",
        flush=True,
    )

    def report(name: str, seconds: float, sel: torch.Tensor) -> None:
        rate = k / seconds
        radius = coverage_radius(x, sel)
        base = results.setdefault("exact", radius)  # the first variant run is the exact one
        print(
            f"{name:34s} {seconds:9.2f} {rate:10.1f} {k_target / rate:12.1f} {radius:9.4f} {radius / base:9.3f}",
            flush=True,
        )

    for name, kwargs in variants:
        t0 = time.perf_counter()
        sel = greedy_coreset(x, k, seed=args.seed, **kwargs)
        seconds = time.perf_counter() - t0
        report(name, seconds, sel)

    if not args.no_lowp:
        start = int(greedy_coreset(x, 1, eps=None, seed=args.seed)[0])
        for dtype in (torch.float16, torch.bfloat16):
            for dim in [dm or None for dm in args.lowp_dims]:
                xp = x if dim is None else random_projection(x, dim, args.seed)
                t0 = time.perf_counter()
                sel = greedy_lowp(xp, k, start, dtype)
                seconds = time.perf_counter() - t0
                label = f"{str(dtype).split('.')[-1]} storage, dim={dim or d}"
                report(label, seconds, sel)

    # random subset as a floor for comparison
    rand = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:k]
    r = coverage_radius(x, rand)
    print(f"{'random subset (for scale)':34s} {'':9s} {'':10s} {'':12s} {r:9.4f} {r / results['exact']:9.3f}")
    print("\nradius: max distance of any point to its nearest selected centre, in the original space", flush=True)


if __name__ == "__main__":
    main()
