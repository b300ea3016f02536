"""Image-score rules measured offline on the development suite: max, top-k mean, re-weighting, region rules.

    python benchmarks/bench_aggregation.py                 # fit (once per set, cached), then the tables
    python benchmarks/bench_aggregation.py --sets bottle pill --force

PatchCore with its defaults is fitted once per suite set (the sets of benchmarks/bench_suite.py, loaded
with its ``load_set``). For each test image the raw patch distances (the (h, w) grid of nearest-neighbour
distances, before upsampling and blur) and today's image score (the re-weighted maximum, paper eq. 7)
are kept, with the held-out training images' grids, the held-out map maxima and the model's pixel
threshold, as ``<set>.npz`` under ``--cache`` (default benchmarks/.aggregation-cache, ignored by git).
Every rule is then computed from those arrays, so trying a rule costs no feature extraction:

* ``max (re-weighted)``: today's score; ``max patch``: the largest raw patch distance (no re-weighting);
  ``top-k mean``: the mean of the k largest raw patch distances; ``top 1 %``: k = 1 % of the patches;
  ``map max``: the largest value of the anomaly map (upsampled, blurred);
* ``region >= N px``: :func:`defectscope.components.regions.region_level`, the highest map level at
  which an 8-connected region of N map pixels lies (a level set at a false-reject rate is the rule
  "defective when a region above that level has >= N pixels"); N = 1 is ``map max``;
* ``largest region``: area (map pixels) of the largest region at or above the model's pixel threshold;
* ``integrated @ qX``: the largest integrated anomaly, sum over a region of (map - level), of the regions
  at or above a level: the pixel threshold (q99 of the held-out map maxima) or a lower quantile of them.

Per rule and set: image AUROC and the **catch rate at 1 % false-reject rate** read from the test images
(:func:`defectscope.evaluation.operating.catch_at_false_reject`; on MVTec AD's 20-26 good test images,
1 % means no good image rejected), and a paired bootstrap (resampling good and defective test images
within the set) of the catch@1 % difference to today's rule: ``[lo, hi]`` is its 95 % interval, the noise
a rule's gain must clear. With ``--held-out`` also the rates at the threshold a fit would set (the 0.99
quantile of the held-out training images' values of the rule). Prints Markdown tables. Asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_suite import SETS, load_set
from machine import hardware_line

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------- cache
def _raw_grids(detector: Any, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, tiles, h, w) raw patch distances and (B,) re-weighted scores: PatchCore._predict_batch's steps."""
    tiling = detector.tile_grid
    feats = detector._patch_features(tiling.split(images))
    b, h, w, d = feats.shape
    patches = feats.reshape(b, h * w, d)
    dist, nn_idx = detector.index.search(patches.reshape(-1, d), 1)
    dist, nn_idx = dist[:, 0].reshape(b, h * w), nn_idx[:, 0].reshape(b, h * w)
    scores = detector._image_scores(patches, dist, nn_idx, detector.memory_bank_, detector.index)
    scores = scores.reshape(-1, tiling.count).amax(dim=1)
    return dist.reshape(-1, tiling.count, h, w).numpy(), scores.numpy()


def compute_set(name: str, data_cache: Path) -> dict[str, Any]:
    """Fit PatchCore (defaults) on the set's training images; the arrays every rule is computed from."""
    from defectscope.data.loader import iter_batches
    from defectscope.detectors import make_detector
    from defectscope.fitting import fit_detector

    split = load_set(name, data_cache)
    detector = make_detector("patchcore")
    t0 = time.perf_counter()
    meta = fit_detector(detector, split.train)
    fit_s = time.perf_counter() - t0
    mean, std = detector.input_stats
    grids, scores, sizes = [], [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in iter_batches(
            [s.path for s in split.test], detector.input_shape, mean, std, resize=detector.resize
        ):
            if batch.failures:
                raise RuntimeError(f"{name}: test images failed to load: {batch.failures}")
            g, s = _raw_grids(detector, batch.images)
            grids.append(g)
            scores.append(s)
            sizes += batch.sizes
    predict_s = time.perf_counter() - t0
    check = detector.predict(next(iter_batches([split.test[0].path], detector.input_shape, mean, std)).images)
    assert np.isclose(check.scores[0], scores[0][0], rtol=1e-5), "the grids' scores differ from predict's"
    return {
        "paths": np.array([str(s.path) for s in split.test]),
        "labels": np.array([s.label for s in split.test], dtype=np.int64),
        "types": np.array([s.defect_type for s in split.test]),
        "grids": np.concatenate(grids).astype(np.float32),
        "scores": np.concatenate(scores).astype(np.float32),
        "sizes": np.array(sizes, dtype=np.int64),
        "train_grids": detector.training_grids_.numpy(),
        "train_scores": detector.training_scores(),
        "train_map_max": detector.training_map_maxima(),
        "threshold": np.float64(meta["threshold"]),
        "pixel_threshold": np.float64(meta["pixel_threshold"]),
        "input_shape": np.array(detector.input_shape),
        "image_size": np.array(detector.input_shape),
        "blur_sigma": np.float64(detector.blur_sigma),
        "fit_seconds": np.float64(fit_s),
        "predict_seconds": np.float64(predict_s),
    }


def load_or_compute(name: str, cache: Path, data_cache: Path, force: bool) -> dict[str, np.ndarray]:
    path = cache / f"{name}.npz"
    if force or not path.is_file():
        arrays = compute_set(name, data_cache)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        print(
            f"  {name}: fitted in {float(arrays['fit_seconds']):.0f} s, {len(arrays['labels'])} test images "
            f"scored in {float(arrays['predict_seconds']):.0f} s",
            flush=True,
        )
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def maps_of(grids: np.ndarray, input_shape: tuple[int, int], sigma: float, chunk: int = 64) -> np.ndarray:
    """(N, 1, h, w) raw grids -> (N, H_in, W_in) anomaly maps, as PatchCore makes them (no tiles)."""
    from defectscope.detectors.base import gaussian_blur

    out = []
    for start in range(0, len(grids), chunk):
        g = torch.from_numpy(grids[start : start + chunk, 0])
        up = torch.nn.functional.interpolate(g.unsqueeze(1), size=input_shape, mode="bilinear", align_corners=False)
        out.append(gaussian_blur(up.squeeze(1), sigma).numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------- rules
#: region sizes tried, in map pixels (the 288 x 288 map has 82,944; one patch cell of the 36 x 36 grid is 64)
REGION_PIXELS = (16, 64, 256, 1024)
TOP_K = (3, 5, 10)
#: levels of the integrated rule: quantiles of the held-out good map maxima (0.99 is the pixel threshold)
LEVEL_QUANTILES = (0.5, 0.9, 0.99)
BOOTSTRAP = 1000

Rule = Callable[[np.ndarray, np.ndarray, dict[str, float]], float]


def _top_k_mean(grid: np.ndarray, k: int) -> float:
    flat = grid.ravel()
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())


def rules() -> dict[str, Rule]:
    """name -> f(raw grid (tiles, h, w), map (H, W), levels) -> the image's value under the rule."""
    from defectscope.components.regions import region_level, region_stats

    out: dict[str, Rule] = {"max patch (no re-weighting)": lambda g, m, lv: float(g.max())}
    for k in TOP_K:
        out[f"top-{k} mean"] = lambda g, m, lv, k=k: _top_k_mean(g, k)
    out["top 1 % mean"] = lambda g, m, lv: _top_k_mean(g, max(1, math.ceil(0.01 * g.size)))
    out["map max"] = lambda g, m, lv: float(m.max())
    for n in REGION_PIXELS:
        out[f"region >= {n} px"] = lambda g, m, lv, n=n: region_level(m, n)
    out["largest region @ pixel thr"] = lambda g, m, lv: region_stats(m, lv["q0.99"]).largest
    for q in LEVEL_QUANTILES:
        out[f"integrated @ q{q:g}"] = lambda g, m, lv, q=q: region_stats(m, lv[f"q{q:g}"]).integrated
    return out


def rule_values(data: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per rule: the test images' values (N,) and the held-out training images' values (T,)."""
    shape = tuple(int(v) for v in data["input_shape"])
    sigma = float(data["blur_sigma"])
    levels = {f"q{q:g}": float(np.quantile(data["train_map_max"], q)) for q in LEVEL_QUANTILES}
    test: dict[str, list[float]] = {}
    train: dict[str, list[float]] = {}
    for grids, out in ((data["grids"], test), (data["train_grids"], train)):
        for start in range(0, len(grids), 64):
            part = grids[start : start + 64]
            maps = maps_of(part, shape, sigma)
            for name, rule in rules().items():
                out.setdefault(name, []).extend(rule(g, m, levels) for g, m in zip(part, maps))
    tests = {"max (re-weighted, today)": data["scores"].astype(np.float64)}
    trains = {"max (re-weighted, today)": data["train_scores"].astype(np.float64)}
    tests |= {k: np.asarray(v) for k, v in test.items()}
    trains |= {k: np.asarray(v) for k, v in train.items()}
    return tests, trains


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """AUROC from good and defective scores (ties count one half), as metrics.image_auroc."""
    good = np.sort(good)
    below = np.searchsorted(good, bad, side="left")
    ties = np.searchsorted(good, bad, side="right") - below
    return float((below + 0.5 * ties).sum() / (good.size * bad.size))


def _catch(good: np.ndarray, bad: np.ndarray, rate: float = 0.01) -> float:
    from defectscope.evaluation.operating import threshold_at_false_reject

    return float(np.mean(bad >= threshold_at_false_reject(good, rate)))


def report(data: dict[str, dict[str, np.ndarray]], held_out: bool = True) -> None:
    from defectscope.evaluation.metrics import image_auroc
    from defectscope.evaluation.operating import catch_at_false_reject

    base = "max (re-weighted, today)"
    rng = np.random.default_rng(0)
    auroc: dict[str, dict[str, float]] = {}
    catch: dict[str, dict[str, float]] = {}
    diffs: dict[str, dict[str, np.ndarray]] = {}  # rule -> set -> (BOOTSTRAP,) catch difference to today
    auroc_diffs: dict[str, dict[str, np.ndarray]] = {}  # the same for image AUROC
    at_held: dict[str, dict[str, tuple[float, float]]] = {}
    for name, arrays in data.items():
        t0 = time.perf_counter()
        tests, trains = rule_values(arrays)
        y = arrays["labels"].astype(bool)
        good_i, bad_i = np.nonzero(~y)[0], np.nonzero(y)[0]
        draws = [(rng.choice(good_i, good_i.size), rng.choice(bad_i, bad_i.size)) for _ in range(BOOTSTRAP)]
        base_boot = np.array([_catch(tests[base][g], tests[base][b]) for g, b in draws])
        base_auroc = np.array([_auroc(tests[base][g], tests[base][b]) for g, b in draws])
        for rule, values in tests.items():
            auroc.setdefault(rule, {})[name] = float(image_auroc(y, values) or 0.0)
            catch.setdefault(rule, {})[name] = float(catch_at_false_reject(y, values, 0.01) or 0.0)
            boot = np.array([_catch(values[g], values[b]) for g, b in draws])
            diffs.setdefault(rule, {})[name] = boot - base_boot
            boot_auroc = np.array([_auroc(values[g], values[b]) for g, b in draws])
            auroc_diffs.setdefault(rule, {})[name] = boot_auroc - base_auroc
            threshold = float(np.quantile(trains[rule], 0.99))
            at_held.setdefault(rule, {})[name] = (
                float(np.mean(values[~y] >= threshold)),
                float(np.mean(values[y] >= threshold)),
            )
        print(f"  {name}: rules computed in {time.perf_counter() - t0:.0f} s", flush=True)
    sets = list(data)
    head = "| rule | " + " | ".join(sets) + " | **mean** | mean diff to today [95 % CI] | worst set diff [95 % CI] |"
    print("\n### Catch rate at 1 % false-reject rate (test images)\n")
    print(head)
    print("|---|" + "---:|" * (len(sets) + 3))
    for rule in catch:
        row = [catch[rule][s] for s in sets]
        mean_diff = np.mean([diffs[rule][s] for s in sets], axis=0)
        point = np.mean([catch[rule][s] - catch[base][s] for s in sets])
        worst = min(sets, key=lambda s: catch[rule][s] - catch[base][s])
        lo, hi = np.percentile(mean_diff, [2.5, 97.5])
        wlo, whi = np.percentile(diffs[rule][worst], [2.5, 97.5])
        wd = catch[rule][worst] - catch[base][worst]
        print(
            f"| {rule} | " + " | ".join(f"{v:.3f}" for v in row) + f" | **{np.mean(row):.3f}** | "
            f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}] | {worst} {wd:+.3f} [{wlo:+.3f}, {whi:+.3f}] |"
        )
    print("\n### Image AUROC (test images)\n")
    print("| rule | " + " | ".join(sets) + " | **mean** | mean diff to today [95 % CI] | sets better / worse |")
    print("|---|" + "---:|" * (len(sets) + 3))
    for rule in auroc:
        row = [auroc[rule][s] for s in sets]
        point = np.mean([auroc[rule][s] - auroc[base][s] for s in sets])
        lo, hi = np.percentile(np.mean([auroc_diffs[rule][s] for s in sets], axis=0), [2.5, 97.5])
        better = sum(auroc[rule][s] > auroc[base][s] for s in sets)
        worse = sum(auroc[rule][s] < auroc[base][s] for s in sets)
        print(
            f"| {rule} | " + " | ".join(f"{v:.4f}" for v in row) + f" | **{np.mean(row):.4f}** | "
            f"{point:+.4f} [{lo:+.4f}, {hi:+.4f}] | {better} / {worse} |"
        )
    if held_out:
        print("\n### At the threshold a fit sets (0.99 quantile of held-out training values): false-reject / catch\n")
        print("| rule | " + " | ".join(sets) + " | **mean** |")
        print("|---|" + "---:|" * (len(sets) + 1))
        for rule in at_held:
            cells = [at_held[rule][s] for s in sets]
            fr, ca = np.mean([c[0] for c in cells]), np.mean([c[1] for c in cells])
            print(f"| {rule} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in cells) + f" | **{fr:.3f} / {ca:.3f}** |")


def cost(name: str, data: dict[str, np.ndarray]) -> None:
    """Milliseconds per image a judge rule adds after the model: its score and its regions record, on the
    set's test maps over their photos (as defectscope.scoring runs it)."""
    from defectscope.judging import JudgeRule

    shape = tuple(int(v) for v in data["input_shape"])
    maps = maps_of(data["grids"], shape, float(data["blur_sigma"]))
    photo = tuple(int(v) for v in data["sizes"][0])
    level = float(np.quantile(data["train_map_max"], 0.9))
    threshold = float(data["pixel_threshold"])
    per_map = photo[0] * photo[1] / (shape[0] * shape[1])
    rules = {
        f"region >= 64 map px ({64 * per_map:.0f} photo px)": JudgeRule("region", min_region=64 * per_map),
        f"region >= 1024 map px ({1024 * per_map:.0f} photo px)": JudgeRule("region", min_region=1024 * per_map),
        "integrated @ q0.9": JudgeRule("integrated", level_quantile=0.9, level=level),
    }
    print(
        f"\n### Cost of a judge rule per image ({name}: {len(maps)} maps of {shape[1]}x{shape[0]} over "
        f"{photo[1]}x{photo[0]} photos)\n"
    )
    print("| rule | ms per image (median of 3 runs) |")
    print("|---|---:|")
    for label, rule in rules.items():
        rule.score(maps[0], photo)  # compiled once (numba) before the clock
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for amap in maps:
                rule.score(amap, photo)
                rule.regions(amap, photo, threshold)
            runs.append((time.perf_counter() - t0) / len(maps) * 1000)
        print(f"| {label} | {float(np.median(runs)):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--cache", type=Path, default=HERE / ".aggregation-cache", help="where each set's arrays are kept")
    p.add_argument("--data-cache", type=Path, default=HERE / ".suite-data", help="where the rotated pill set is built")
    p.add_argument("--force", action="store_true", help="fit and score again even when cached")
    p.add_argument("--cache-only", action="store_true", help="fit and cache, print no table")
    p.add_argument("--cost", action="store_true", help="time the judge rules per image instead of the tables")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(hardware_line(), flush=True)
    data = {name: load_or_compute(name, args.cache, args.data_cache, args.force) for name in args.sets}
    if args.cost:
        for name, arrays in data.items():
            cost(name, arrays)
    elif not args.cache_only:
        report(data)


if __name__ == "__main__":
    main()
