"""The command line as scripts use it: --help time, one image's cold path, -exec versus paths on stdin.

    python benchmarks/bench_cli.py                 # bottle model fitted once into benchmarks/.cli-data
    python benchmarks/bench_cli.py --images 100 --repeats 3

Prints:

* wall time of ``defectscope --help`` and ``defectscope predict --help`` (median of --repeats runs);
* the cold path of ``defectscope predict MODEL one.png``: total wall time (median), and where it goes,
  measured in a fresh interpreter step by step (Python start, imports, model file read + checksum,
  backbone construction + weights, first forward, the rest of the first predict);
* ``find ... -exec defectscope predict MODEL {} \\;`` against ``find ... -print0 | defectscope predict
  MODEL - -0`` on the same --images bottle test images: seconds in all and per image.

Runs the installed ``defectscope`` of this interpreter's environment. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import BOTTLE, hardware_line

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "defectscope.cli"]

_STEPS = r"""
import time, sys
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
import defectscope.api as api
from defectscope.cli.commands import main
t.append(time.perf_counter())
model = api.load(sys.argv[1])
t.append(time.perf_counter())
model.detector.extractor
t.append(time.perf_counter())
import torch
with torch.inference_mode():
    model.detector.extractor(torch.zeros(1, 3, *((model.detector.image_size,) * 2 if isinstance(model.detector.image_size, int) else model.detector.image_size)))
t.append(time.perf_counter())
model.predict(sys.argv[2], maps=False)
t.append(time.perf_counter())
print(" ".join(f"{b - a:.3f}" for a, b in zip(t, t[1:])))
"""
_STEP_NAMES = (
    "import torch",
    "import defectscope (api, cli)",
    "defectscope.load: model file read + checksum, cached traced backbone loaded",
    "backbone built + weights loaded (0 on a cache hit: done by load)",
    "first forward (1 x 3 x S x S)",
    "rest of the first predict (decode, resize, kNN, score)",
)


def _wall(cmd: list[str], **kw) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kw)
    return time.perf_counter() - start


def _median(cmd: list[str], repeats: int) -> float:
    return statistics.median(_wall(cmd) for _ in range(repeats))


def _model(path: Path) -> Path:
    if not path.is_file():
        print(f"fitting {path} on {BOTTLE} (once)", flush=True)
        subprocess.run([*CLI, "fit", str(BOTTLE), "-o", str(path), "--no-progress"], check=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100, help="images for -exec versus - (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="runs per timing, median reported (default 3)")
    p.add_argument("--model", type=Path, default=HERE / ".cli-data" / "bottle.dsmodel")
    args = p.parse_args()
    if not (BOTTLE / "test").is_dir():
        sys.exit(f"bench_cli needs MVTec AD bottle at {BOTTLE}")
    args.model.parent.mkdir(parents=True, exist_ok=True)
    model = _model(args.model)
    images = sorted((BOTTLE / "test").rglob("*.png"))
    images = (images * (args.images // len(images) + 1))[: args.images]
    print(hardware_line(), flush=True)

    print(f"\n| command | wall s (median of {args.repeats}) |\n|---|---:|")
    print(f"| `defectscope --help` | {_median([*CLI, '--help'], args.repeats):.2f} |")
    print(f"| `defectscope predict --help` | {_median([*CLI, 'predict', '--help'], args.repeats):.2f} |")
    one = _median([*CLI, "predict", str(model), str(images[0])], args.repeats)
    print(f"| `defectscope predict MODEL one.png` (cold) | {one:.2f} |")
    python = _median([sys.executable, "-c", "pass"], args.repeats)

    runs = [
        [
            float(v)
            for v in subprocess.run(
                [sys.executable, "-c", _STEPS, str(model), str(images[0])], check=True, capture_output=True, text=True
            ).stdout.split()
        ]
        for _ in range(args.repeats)
    ]
    steps = [statistics.median(r[i] for r in runs) for i in range(len(_STEP_NAMES))]
    print(f"\nCold path of one image, step by step (fresh interpreter, median of {args.repeats}):\n")
    print("| step | s |\n|---|---:|")
    print(f"| Python start (`python -c pass`) | {python:.2f} |")
    for name, value in zip(_STEP_NAMES, steps):
        print(f"| {name} | {value:.2f} |")
    print(f"| **sum** | **{python + sum(steps):.2f}** |")

    exec_s = sum(_wall([*CLI, "predict", str(model), str(path)]) for path in images)
    listing = b"".join(bytes(path) + b"\0" for path in images)
    start = time.perf_counter()
    subprocess.run([*CLI, "predict", str(model), "-", "-0"], input=listing, check=True, capture_output=True)
    stdin_s = time.perf_counter() - start
    print(f"\n{len(images)} bottle test images:\n")
    print("| how | s in all | s per image |\n|---|---:|---:|")
    print(
        f"| `find ... -exec defectscope predict MODEL {{}} \\;` (one process per image) | {exec_s:.1f} | "
        f"{exec_s / len(images):.2f} |"
    )
    print(
        f"| `find ... -print0 \\| defectscope predict MODEL - -0` (one process) | {stdin_s:.1f} | "
        f"{stdin_s / len(images):.3f} |"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
