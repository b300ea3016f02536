"""The development suite: any method and configuration over five real sets, per set and on the mean.

    python benchmarks/bench_suite.py                                   # the three methods' defaults
    python benchmarks/bench_suite.py --methods patchcore --params '{"coreset_ratio": 0.01}'
    python benchmarks/bench_suite.py --sets bottle pill --methods spade --force

Sets (defaults are decided on the mean over all of them, never on one):

* ``bottle``, ``pill``: MVTec AD categories under ../shared/data/mvtec_ad (DEFECTSCOPE_SHARED_DATA);
* ``elpv-mono``, ``elpv-poly``: the demo's ELPV split (200 good training cells; 100 good and every
  defective cell to test; image labels only), from ``pip install elpv-dataset``;
* ``pill-rotated``: pill with every train and test photo turned by a seeded random angle (0-360
  degrees) about its centre, the uncovered corners filled with the photo's own border colour, and
  each mask turned alike (nearest neighbour): parts on a line are not always placed the same way.
  Built once into ``--data-cache`` (default benchmarks/.suite-data, ignored by git).

Each (method, parameters, set) cell is fitted from scratch and evaluated (image AUROC, pixel AUROC,
AUPRO, fit seconds, predict images/s as ``evaluate`` measures it, the process's peak resident
memory (the cell's own when one set is run per process), and every test image's score
with the threshold, so score ensembles can be computed from stored cells) and stored as JSON under
``--out`` (default benchmarks/.suite-results), keyed by the detector's full parameters (defaults
included); a later run reuses finished cells unless ``--force``.
Prints one Markdown table per method and configuration, with the mean row; the catch rates at 0.5, 1,
2 and 5 % false-reject rate and both rates at the model's threshold are computed from each cell's
stored scores (older cells included). Asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import SHARED_DATA, hardware_line

HERE = Path(__file__).resolve().parent
SETS = ("bottle", "pill", "elpv-mono", "elpv-poly", "pill-rotated")
METHODS = ("patchcore", "padim", "spade")
COLUMNS = (
    ("image_auroc", "image AUROC", 4),
    ("pixel_auroc", "pixel AUROC", 4),
    ("aupro", "AUPRO", 4),
    ("catch_at_fr_0.5pct", "catch @0.5 % FR", 3),
    ("catch_at_fr_1pct", "catch @1 % FR", 3),
    ("catch_at_fr_2pct", "catch @2 % FR", 3),
    ("catch_at_fr_5pct", "catch @5 % FR", 3),
    ("catch_at_threshold", "catch @threshold", 3),
    ("false_reject_at_threshold", "FR @threshold", 3),
    ("fit_seconds", "fit s", 1),
    ("images_per_second", "predict img/s", 1),
    ("peak_rss_mb", "peak MB", 0),
)


# ----------------------------------------------------------------------------------------- sets
def build_rotated(source: Path, target: Path, seed: int = 0) -> Path:
    """An MVTec-layout copy of ``source`` with every image (and its mask) turned by a random angle."""
    import cv2
    from PIL import Image

    done = target / ".complete"
    if done.is_file():
        return target
    rng = np.random.default_rng(seed)
    images = sorted(p for p in source.rglob("*.png") if "ground_truth" not in p.parts)
    for path in images:
        rel = path.relative_to(source)
        angle = float(rng.uniform(0.0, 360.0))
        photo = np.asarray(Image.open(path).convert("RGB"))
        h, w = photo.shape[:2]
        turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        border = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        out = cv2.warpAffine(photo, turn, (w, h), flags=cv2.INTER_LINEAR, borderValue=fill)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(target / rel)
        if rel.parts[0] == "test" and rel.parts[1] != "good":
            mask = source / "ground_truth" / rel.parts[1] / f"{path.stem}_mask.png"
            if mask.is_file():
                m = np.asarray(Image.open(mask).convert("L"))
                turned = cv2.warpAffine(m, turn, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
                out_mask = target / "ground_truth" / rel.parts[1] / mask.name
                out_mask.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(turned).save(out_mask)
    done.write_text(f"rotated copy of {source}, seed {seed}\n")
    return target


def load_set(name: str, cache: Path) -> Any:
    """The Split of a suite set."""
    from defectscope.data.layouts import mvtec_category

    if name in ("bottle", "pill"):
        return mvtec_category(SHARED_DATA / "mvtec_ad" / name)
    if name == "pill-rotated":
        return mvtec_category(build_rotated(SHARED_DATA / "mvtec_ad" / "pill", cache / "pill-rotated-seed0"))
    from defectscope.data.elpv import elpv_split

    return elpv_split(name.split("-")[1])


# ----------------------------------------------------------------------------------------- cells
def cell_path(out: Path, method: str, params: dict[str, Any], name: str, align: str = "none") -> Path:
    """The cell's file: keyed by the detector's full parameters (defaults included, so a changed default
    never reuses an old cell), the set and the alignment."""
    from defectscope.detectors import comparable_params, make_detector

    # parameters added later, at the value that reproduces the old computation, are left out: old cells stay valid
    full = comparable_params(make_detector(method, **params).get_params())
    spec = {"m": method, "p": full, "s": name, **({"a": align} if align != "none" else {})}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return out / f"{method}-{name}-{key}.json"


def run_cell(method: str, params: dict[str, Any], name: str, cache: Path, align: str = "none") -> dict[str, Any]:
    from defectscope.components.align import make_aligner
    from defectscope.data.images import load_image
    from defectscope.detectors import make_detector
    from defectscope.evaluation.evaluate import evaluate_detector
    from defectscope.fitting import fit_detector

    split = load_set(name, cache)
    detector = make_detector(method, **params)
    detector.extractor  # backbone built before the clock starts
    t0 = time.perf_counter()
    aligner = make_aligner(align, load_image(split.train[0]), reference=str(split.train[0]))
    meta = fit_detector(detector, split.train, aligner=aligner)
    fit_s = time.perf_counter() - t0
    result = evaluate_detector(detector, split, float(meta["threshold"]), aligner=aligner)
    return {
        "method": method,
        "params": params,
        "set": name,
        "align": align,
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "fit_seconds": fit_s,
        "images_per_second": result["images_per_second"],
        "n_train": len(split.train),
        "layers": list(detector.layers or []),
        "threshold": float(meta["threshold"]),
        "scores": [[r["path"], r["label"], r["score"]] for r in result["images"]],
        # the process's peak resident memory so far: the cell's own only when it is the process's first
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def with_operating_points(cell: dict[str, Any]) -> dict[str, Any]:
    """The cell with its catch rates at 0.5, 1, 2 and 5 % false-reject rate (FR) and both rates at the
    model's threshold, computed from its stored per-image scores (so cells stored before these
    columns existed get them too); not written back."""
    from defectscope.evaluation.operating import flat_summary, operating_points

    labels = np.array([label for _, label, _ in cell["scores"]], dtype=np.int64)
    scores = np.array([score for _, _, score in cell["scores"]], dtype=np.float64)
    return {**cell, **flat_summary(operating_points(labels, scores, threshold=cell["threshold"]))}


def table(cells: list[dict[str, Any]]) -> str:
    f = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| set | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for c in cells:
        lines.append(f"| {c['set']} | " + " | ".join(f(c.get(k), d) for k, _, d in COLUMNS) + " |")
    means = []
    for key, _, d in COLUMNS:
        values = [c[key] for c in cells if c.get(key) is not None]
        means.append(f"**{f(float(np.mean(values)) if values else None, d)}**")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--params", default="{}", help="parameters for every method given, as JSON")
    p.add_argument(
        "--align",
        choices=["none", "rot90", "rigid", "silhouette", "rigid+ecc", "silhouette+ecc"],
        default="none",
        help="align every image to the first training image (as fit --align)",
    )
    p.add_argument("--out", type=Path, default=HERE / ".suite-results", help="where finished cells are kept")
    p.add_argument("--data-cache", type=Path, default=HERE / ".suite-data", help="where the rotated pill set is built")
    p.add_argument("--force", action="store_true", help="recompute cells already stored")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        params = json.loads(args.params)
    except ValueError as exc:
        p.error(f"--params must be a JSON object such as '{{\"coreset_ratio\": 0.01}}': {exc}")
    if not isinstance(params, dict):
        p.error(f"--params must be a JSON object, got {args.params}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(hardware_line(), flush=True)
    for method in args.methods:
        cells = []
        for name in args.sets:
            path = cell_path(args.out, method, params, name, args.align)
            if path.is_file() and not args.force:
                cell = json.loads(path.read_text())
            else:
                cell = run_cell(method, params, name, args.data_cache, args.align)
                path.write_text(json.dumps(cell, indent=1))
            cell = with_operating_points(cell)
            print(
                f"  {method} {name}: image {cell['image_auroc']:.4f}, catch {cell['catch_at_fr_1pct']:.3f} at 1 % "
                f"false-reject rate ({cell['fit_seconds']:.0f} s fit)",
                flush=True,
            )
            cells.append(cell)
        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        label += f", --align {args.align}" if args.align != "none" else ""
        print(f"\n{method} ({label}; layers {','.join(cells[0]['layers'])})\n\n{table(cells)}\n", flush=True)
    print(
        "catch @x % FR: share of defective test images caught at the lowest threshold rejecting at most x % of the "
        "good test images (FR: false-reject rate); @threshold: both rates at the model's own threshold",
        flush=True,
    )


if __name__ == "__main__":
    main()
