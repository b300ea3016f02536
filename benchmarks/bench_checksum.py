"""What the model file's checksum costs at load time; prints numbers.

    python benchmarks/bench_checksum.py [MODEL]

sha256 over a PatchCore bank the size of bottle's (21,402 x 152 float32) and over PaDiM's inverse
covariances at its defaults (4,096 x 176 x 176 float32, 508 MB), and, given a model file, the whole
``read_model_file`` (decode + verify) of it.
"""

from __future__ import annotations

import sys
import time

import torch
from machine import hardware_line


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from defectscope.io import model_checksum, read_model_file

    print(hardware_line())
    bank = {"memory_bank": torch.randn(21402, 152)}
    padim = {"inv_cov": torch.randn(4096, 176, 176)}
    s = timed(lambda: model_checksum(bank, {}))
    print(f"checksum, PatchCore bank 21402 x 152 ({bank['memory_bank'].numel() * 4 / 1e6:.0f} MB): {1000 * s:.1f} ms")
    s = timed(lambda: model_checksum(padim, {}))
    print(f"checksum, PaDiM inverse covariances (508 MB): {1000 * s:.0f} ms ({0.508 / s:.2f} GB/s)")
    for path in sys.argv[1:]:
        print(
            f"read_model_file({path}) with verification: {1000 * timed(lambda path=path: read_model_file(path)):.1f} ms"
        )


if __name__ == "__main__":
    main()
