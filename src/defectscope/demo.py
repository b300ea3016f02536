"""`defectscope demo`: PatchCore on real solar-cell electroluminescence images (ELPV).

Split (documented in the README): good monocrystalline cells (defect probability 0) are
shuffled with the seed; ``n_train`` of them are learned from, the next 100 are held out as
good test cells; every monocrystalline cell labelled defective with probability 1.0 is a
defective test cell. Cells labelled 1/3 or 2/3 are left out (uncertain labels).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .api import fit
from .common.jsonout import dumps
from .data.elpv import elpv_split
from .evaluation.evaluate import format_summary

log = logging.getLogger(__name__)


def run_demo(
    output: Path,
    *,
    n_train: int = 200,
    coreset_ratio: float = 0.1,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Fit, save, evaluate and write heatmaps under ``output``; prints what it did and returns the metrics."""
    split = elpv_split("mono", n_train=n_train, seed=seed, test_good=100)
    n_def = sum(s.label for s in split.test)
    print(
        f"ELPV monocrystalline cells: learning from {len(split.train)} good cells; testing on "
        f"{len(split.test) - n_def} held-out good and {n_def} defective cells"
    )
    model = fit(
        split.train,
        method="patchcore",
        coreset_ratio=coreset_ratio,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        data_name="elpv:mono",
    )
    meta = model.meta
    model_path = model.save(output / "elpv_mono.dsmodel")
    print(f"model      {model_path} (fit {meta['training']['fit_seconds']:.1f} s, threshold {meta['threshold']:.4f})")

    heatmaps = output / "heatmaps"
    result = model.evaluate(split, batch_size=batch_size, progress=progress, heatmap_dir=heatmaps)
    result["model"] = str(model_path)
    result["fit_seconds"] = meta["training"]["fit_seconds"]
    (output / "metrics.json").write_text(dumps(result, indent=2))
    print(format_summary(result))
    print(
        f"heatmaps   {heatmaps}/ (good/ and defective/: each cell beside its map, with the verdict; white "
        f"outline = above the pixel threshold {meta['pixel_threshold']:.4f})"
    )
    print(f"metrics    {output / 'metrics.json'}")
    return result
