"""Score ensembles over the development suite, from cells bench_suite.py has stored (nothing is fitted).

    python benchmarks/suite_ensemble.py patchcore padim
    python benchmarks/suite_ensemble.py patchcore 'spade:{"k": 5}' 'patchcore:{"image_size": 320}'

Each member is METHOD or METHOD:PARAMS (PARAMS as bench_suite's ``--params``). For every set where all members
have a stored cell with per-image scores, each member's score is divided by that member's threshold (so 1.0 is
each model's own decision boundary, whatever its scale: PatchCore distances, PaDiM Mahalanobis distances, SPADE
kNN distances) and the ensemble score is their mean; printed: each member's image AUROC and the ensemble's, per
set and on the mean. Run bench_suite.py first for any member whose cells are missing (cells stored before
per-image scores were kept need ``--force``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_suite import HERE, SETS, cell_path


def member(spec: str) -> tuple[str, dict]:
    method, _, params = spec.partition(":")
    return method, (json.loads(params) if params else {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("members", nargs="+", help="METHOD or METHOD:PARAMS (JSON), two or more")
    p.add_argument("--out", type=Path, default=HERE / ".suite-results", help="where bench_suite.py keeps its cells")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    args = p.parse_args()
    from defectscope.evaluation.metrics import image_auroc

    members = [member(m) for m in args.members]
    if len(members) < 2:
        p.error("an ensemble needs two or more members")
    header = " | ".join(args.members)
    print(f"| set | {header} | ensemble (mean of score / threshold) |\n|---|" + "---:|" * (len(members) + 1))
    rows = []
    for name in args.sets:
        cells = []
        for method, params in members:
            path = cell_path(args.out, method, params, name)
            cell = json.loads(path.read_text()) if path.is_file() else None
            cells.append(cell if cell is not None and "scores" in cell else None)
        if any(c is None for c in cells):
            missing = [spec for spec, c in zip(args.members, cells) if c is None]
            print(f"| {name} | (no stored per-image scores for {', '.join(missing)}: run bench_suite.py) |")
            continue
        paths = [row[0] for row in cells[0]["scores"]]
        labels = np.array([row[1] for row in cells[0]["scores"]])
        normalised = []
        for c in cells:
            by_path = {row[0]: row[2] for row in c["scores"]}
            if set(by_path) != set(paths):
                raise SystemExit(f"{name}: the members scored different images; recompute their cells")
            normalised.append(np.array([by_path[q] for q in paths], dtype=float) / float(c["threshold"]))
        aurocs = [float(c["image_auroc"]) for c in cells] + [image_auroc(labels, np.mean(normalised, axis=0))]
        rows.append(aurocs)
        print(f"| {name} | " + " | ".join(f"{a:.4f}" for a in aurocs) + " |")
    if rows:
        print("| **mean** | " + " | ".join(f"**{v:.4f}**" for v in np.mean(rows, axis=0)) + " |")


if __name__ == "__main__":
    main()
