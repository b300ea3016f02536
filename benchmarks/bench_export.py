"""Predict speed and agreement of an exported model: torch against onnxruntime and OpenVINO.

    python benchmarks/bench_export.py                  # bottle PatchCore fitted once into benchmarks/.export-data
    python benchmarks/bench_export.py --method padim --images 40 --threads 2

One PatchCore (or PaDiM) model on MVTec AD bottle at the default settings (PatchCore 288 px, PaDiM 256 px; every training
image unless --train), exported to ONNX and to OpenVINO IR. Then the same --images bottle test images
(every defect type, in order) are scored through ``defectscope.load(...).predict`` -- file decoding,
resize and the model, as ``defectscope predict`` does -- by:

* torch (the model file),
* onnxruntime (the ONNX export),
* OpenVINO on the ONNX export and on the IR export,

each with --threads threads, one warm-up batch first, one timed run. Prints a Markdown table:
images/s, the largest relative score difference from torch, the largest map difference as a
fraction of the torch map's range, and whether every judgement is the same. The machine may be
shared: the load average is printed before and after. Asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from machine import BOTTLE, hardware_line

HERE = Path(__file__).resolve().parent


def _test_images(n: int) -> list[Path]:
    """n bottle test images spread over the defect types (round robin)."""
    folders = [sorted(f.glob("*.png")) for f in sorted((BOTTLE / "test").iterdir()) if f.is_dir()]
    out: list[Path] = []
    i = 0
    while len(out) < n and any(i < len(f) for f in folders):
        out += [f[i] for f in folders if i < len(f)]
        i += 1
    return out[:n]


def _model(method: str, n_train: int | None, data: Path) -> Path:
    import defectscope
    from defectscope.detectors import make_detector

    # keyed on the method's default parameters, so a model cached under earlier defaults is not reused
    params = json.dumps(make_detector(method).get_params(), sort_keys=True, default=str)
    key = hashlib.sha256(params.encode()).hexdigest()[:12]
    path = data / f"bottle-{method}-{n_train or 'all'}-{key}.dsmodel"
    if not path.exists():
        train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:n_train]
        print(f"fitting {method} on {len(train)} bottle training images (once) ...", flush=True)
        data.mkdir(parents=True, exist_ok=True)
        defectscope.fit(train, method=method).save(path)
    return path


def _export(model: Path, fmt: str, data: Path) -> Path:
    from defectscope.export.exporter import export_model

    folder = data / f"{model.stem}-{fmt}"
    if not folder.exists():
        print(f"exporting to {fmt} ...", flush=True)
        export_model(model, folder, fmt)
    return folder


def _timed(model, images: list[Path], batch_size: int) -> tuple[float, list]:
    model.predict(images[:batch_size], batch_size=batch_size)  # warm-up: first-run allocations, lazy init
    start = time.perf_counter()
    results = model.predict(images, batch_size=batch_size)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["patchcore", "padim"], default="patchcore")
    parser.add_argument("--train", type=int, default=None, help="training images (default: all 209)")
    parser.add_argument("--images", type=int, default=40, help="bottle test images scored (default 40)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", type=Path, default=HERE / ".export-data", help="where models and exports are kept")
    args = parser.parse_args()

    import defectscope
    from defectscope.export import set_threads

    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    model_path = _model(args.method, args.train, args.data)
    onnx_dir, ir_dir = _export(model_path, "onnx", args.data), _export(model_path, "openvino", args.data)
    images = _test_images(args.images)
    print(hardware_line())
    runs = [
        ("torch (model file)", model_path, None),
        ("onnxruntime (ONNX)", onnx_dir, "onnxruntime"),
        ("OpenVINO (ONNX)", onnx_dir, "openvino"),
        ("OpenVINO (IR)", ir_dir, "openvino"),
    ]
    rows, reference = [], None
    for name, path, runtime in runs:
        model = defectscope.load(path, runtime=runtime) if runtime else defectscope.load(path)
        seconds, results = _timed(model, images, args.batch_size)
        if reference is None:
            reference = results
            rows.append((name, len(images) / seconds, "-", "-", "-"))
            continue
        rel = max(abs(b.score / a.score - 1.0) for a, b in zip(reference, results))
        maps = max(
            float(np.abs(a.anomaly_map - b.anomaly_map).max() / np.ptp(a.anomaly_map))
            for a, b in zip(reference, results)
        )
        same = all(a.judgement == b.judgement for a, b in zip(reference, results))
        rows.append((name, len(images) / seconds, f"{rel:.1e}", f"{maps:.1e}", "yes" if same else "NO"))
    info = defectscope.load(model_path).info()
    print(
        f"\n{args.method} on bottle, {info['image_size']} px, {info['n_train']} training images; {len(images)} test "
        f"images, batch {args.batch_size}, {args.threads} threads each; load average after: "
        + " ".join(f"{v:.2f}" for v in os.getloadavg())
        + "\n"
    )
    print("| runtime | images/s | max score difference (relative) | max map difference (of range) | same judgements |")
    print("|---|---:|---:|---:|:---:|")
    for name, speed, rel, maps, same in rows:
        print(f"| {name} | {speed:.2f} | {rel} | {maps} | {same} |")


if __name__ == "__main__":
    main()
