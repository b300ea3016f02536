"""``--roi auto`` on the development suite: PatchCore with and without the automatic region of interest.

    python benchmarks/bench_roi.py                                  # bottle, pill, pill-rotated
    python benchmarks/bench_roi.py --margins 0.03 0.06              # the widening of the auto region
    python benchmarks/bench_roi.py --sets bottle pill pill-rotated elpv-mono elpv-poly
    python benchmarks/bench_roi.py --params '{"image_size": 256}'

For each set: PatchCore (defaults, or ``--params``) is fitted once on the good training images (the model
file is kept under ``--out``/models and reused), the automatic region is read from the same training
images (:func:`defectscope.components.roi.resolve_roi`, as ``fit --roi auto`` does), and the test set is
scored twice: over the whole image and inside the region. A region leaves the memory bank as it is (it
changes only what is scored: tests/test_roi.py, ``test_the_region_leaves_the_memory_bank_alone``), so
these test scores are those of ``fit --roi auto`` exactly; only the fitted threshold would differ, and
no figure here uses it. ``--margins``: the widening of the union of silhouettes, as a share of the input
side, one region each (default: ``fit``'s). Prints per set and on the mean: image AUROC, the catch rate at
a 1 % false-reject rate (:func:`defectscope.evaluation.operating.catch_at_false_reject`, read from the test
scores), pixel AUROC, the share of the model input the region keeps and the seconds ``--roi auto`` took.
Each set's per-image scores go to ``--out`` as JSON. Asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_suite import load_set
from machine import hardware_line

from defectscope.components.roi import AUTO_MARGIN

HERE = Path(__file__).resolve().parent
OBJECT_SETS = ("bottle", "pill", "pill-rotated")
SETS = (*OBJECT_SETS, "elpv-mono", "elpv-poly")


def _key(params: dict[str, Any], name: str) -> str:
    from defectscope.detectors import comparable_params, make_detector

    full = comparable_params(make_detector("patchcore", **params).get_params())
    return hashlib.sha256(json.dumps({"p": full, "s": name}, sort_keys=True).encode()).hexdigest()[:12]


def fitted(name: str, split: Any, params: dict[str, Any], out: Path) -> Any:
    """The PatchCore model of a set, fitted once and kept as a model file."""
    import defectscope

    path = out / "models" / f"patchcore-{name}-{_key(params, name)}.dsmodel"
    if path.is_file():
        return defectscope.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = defectscope.fit([str(p) for p in split.train], method="patchcore", data_name=name, **params)
    model.save(path)
    return model


def scored(detector: Any, split: Any, threshold: float, region: np.ndarray | None) -> dict[str, Any]:
    """The test set scored over ``region`` (None: the whole image): the figures and every image's score."""
    from defectscope.evaluation.evaluate import evaluate_detector
    from defectscope.evaluation.operating import catch_at_false_reject

    detector.set_roi(region)
    try:
        result = evaluate_detector(detector, split, threshold)
    finally:
        detector.set_roi(None)
    labels = np.array([r["label"] for r in result["images"]])
    scores = np.array([r["score"] for r in result["images"]])
    return {
        "image_auroc": result["image_auroc"],
        "catch_at_1pct": catch_at_false_reject(labels, scores, 0.01),
        "pixel_auroc": result["pixel_auroc"],
        "scores": [[r["path"], r["label"], r["score"]] for r in result["images"]],
    }


def fill(row: dict[str, Any], name: str, params: dict[str, Any], margins: list[float], out: Path, cache: Path) -> bool:
    """Add to a set's ``row`` what it lacks: the whole-image scores and each margin's region and scores.
    Returns whether anything was computed."""
    from defectscope.components.roi import resolve_roi

    missing = "whole" not in row or any(f"auto@{m:g}" not in row for m in margins)
    if not missing:
        return False
    split = load_set(name, cache)
    model = fitted(name, split, params, out)
    detector = model.detector
    if "whole" not in row:
        row["whole"] = scored(detector, split, model.threshold, None)
    for margin in margins:
        key = f"auto@{margin:g}"
        if key in row:
            continue
        t0 = time.perf_counter()
        region, record = resolve_roi("auto", detector.input_shape, detector.resize, paths=split.train, margin=margin)
        seconds = time.perf_counter() - t0
        # no part found: the whole image is judged, as fit does
        found = row["whole"] if region is None else scored(detector, split, model.threshold, region)
        row[key] = {**found, "roi": record, "auto_seconds": seconds}
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(OBJECT_SETS))
    p.add_argument("--params", default="{}", help="PatchCore parameters, as JSON")
    p.add_argument("--margins", nargs="+", type=float, default=[AUTO_MARGIN], help="widenings of the auto region")
    p.add_argument("--out", type=Path, default=HERE / ".roi-results", help="where models and cells are kept")
    p.add_argument("--data-cache", type=Path, default=HERE / ".suite-data", help="where the rotated pill set is built")
    p.add_argument("--force", action="store_true", help="recompute what is stored (models are kept)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    args.out.mkdir(parents=True, exist_ok=True)
    print(hardware_line(), flush=True)
    rows = []
    for name in args.sets:
        path = args.out / f"roi-{name}-{_key(params, name)}.json"
        row = {} if args.force or not path.is_file() else json.loads(path.read_text())
        row.update(set=name, params=params)
        if fill(row, name, params, args.margins, args.out, args.data_cache):
            path.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(f"  {name}: done", flush=True)
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    keys = ("image_auroc", "catch_at_1pct", "pixel_auroc")
    print("\nPatchCore" + (f" ({args.params})" if params else "") + ": whole image, then --roi auto at each margin\n")
    print("| set | region | image AUROC | catch @ 1 % FRR | pixel AUROC | region share | auto s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    sides = ["whole"] + [f"auto@{m:g}" for m in args.margins]
    for row in rows:
        for side in sides:
            cell = row[side]
            roi = cell.get("roi") or {}
            share = "1.00" if side == "whole" else ("none found" if roi.get("share") is None else f"{roi['share']:.2f}")
            seconds = f"{cell['auto_seconds']:.0f}" if "auto_seconds" in cell else ""
            label = "whole image" if side == "whole" else f"auto, margin {side.split('@')[1]}"
            values = " | ".join(f(cell[k]) for k in keys)
            print(f"| {row['set']} | {label} | {values} | {share} | {seconds} |")
    for side in sides:
        label = "whole image" if side == "whole" else f"auto, margin {side.split('@')[1]}"
        means = " | ".join(f"**{f(float(np.mean([r[side][k] for r in rows])))}**" for k in keys)
        print(f"| **mean** | {label} | {means} | | |")


if __name__ == "__main__":
    main()
