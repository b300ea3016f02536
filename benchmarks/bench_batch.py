"""defectscope batch: images/s of the local engine and of Ray with 1 and 2 workers on the same ELPV cells,
Ray's start-up and per-block overhead, the driver's ceiling, and a cluster sized on paper.

    PYTHONPATH=src python benchmarks/bench_batch.py                  # 1,000 cells, model fitted once
    PYTHONPATH=src python benchmarks/bench_batch.py --images 200     # quicker

Needs ``pip install elpv-dataset`` and the ray extra. The model is PatchCore with its defaults, fitted on
200 good monocrystalline cells (the demo's split) into --work; the scored cells are the first --images of
ELPV's labels.csv (mono and poly, good and defective). Runs, each on the same list:

* local: ``--engine local`` in this process, torch on every core;
* Ray, 1 worker and 2 workers: a local cluster of this machine's cores (``ray.init(num_cpus=cores)``), one
  torch thread per actor; time to the first row (actor start, model load, first block) and in all.

Overheads: ``ray.init`` itself; per block, an actor pool that returns its input unchanged over the same
number of blocks (``(T(n blocks) - T(1 block)) / (n - 1)``). The driver's ceiling: rows/s of the Parquet
sink plus the Arrow -> rows conversion on synthetic rows. From the measured per-core rate: the cores for
10 million images a day; what crosses the network per image. Prints the load average before and after
each run (other work on the machine slows every figure). Asserts nothing; writes --work/bench_batch.json, and
each run to --work/run_NAME.json as it ends: --reuse-runs takes those instead of running them again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from machine import hardware_line

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def model_file(work: Path) -> Path:
    import defectscope
    from defectscope.data.elpv import elpv_split

    path = work / "elpv_mono.dsmodel"
    if not path.is_file():
        split = elpv_split("mono", n_train=200, seed=0)
        start = time.perf_counter()
        defectscope.fit([str(p) for p in split.train], method="patchcore", data_name="elpv mono 200").save(path)
        print(f"fitted {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def cell_paths(n: int) -> list[str]:
    from defectscope.data.elpv import _data_dir, _read_labels

    return [str(path) for path, _, _ in _read_labels(_data_dir())][:n]


def timed_run(name: str, work: Path, reuse: bool, model: Path, listing: Path, **options) -> dict:
    saved = work / f"run_{name}.json"
    if reuse and saved.is_file():
        return json.loads(saved.read_text())
    from defectscope.batch import run_batch

    out = work / f"{name}.parquet"
    before = load_average()

    first: list[float] = []
    start = time.perf_counter()
    summary = run_batch(
        model,
        [str(listing)],
        out,
        force=True,
        on_rows=lambda n: first or first.append(time.perf_counter() - start),
        **options,
    )
    result = {
        "seconds": round(summary.seconds, 2),
        "images": summary.scored,
        "errors": summary.errors,
        "images_per_s": round(summary.images_per_second, 2),
        "first_row_s": round(first[0], 2) if first else None,
        "load_before": before,
        "load_after": load_average(),
        **{k: v for k, v in summary.engine_info.items() if k in ("workers", "threads", "blocks", "block_rows")},
    }
    saved.write_text(json.dumps(result) + "\n")
    return result


class _Identity:
    def __call__(self, batch):
        return batch


def block_overhead(n_blocks: int, block_rows: int, workers: int) -> dict:
    """Seconds per block of an actor pool that does nothing, over ``n_blocks`` blocks of paths."""
    import pyarrow as pa
    import ray.data

    def run(n: int) -> float:
        blocks = [pa.table({"path": [f"/archive/cell{i:07d}.png" for i in range(block_rows)]}) for _ in range(n)]
        start = time.perf_counter()
        ds = ray.data.from_arrow(blocks).map_batches(
            _Identity,
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass
        return time.perf_counter() - start

    one, many = run(1), run(n_blocks)
    return {
        "one_block_s": round(one, 3),
        "blocks": n_blocks,
        "all_blocks_s": round(many, 3),
        "per_block_ms": round(1000 * (many - one) / max(1, n_blocks - 1), 2),
    }


def driver_ceiling(work: Path, n: int = 200_000) -> dict:
    """Rows/s the driver can take: Arrow blocks -> rows (dedup) -> Parquet parts, on synthetic rows."""
    import pyarrow as pa

    from defectscope.batch.rows import arrow_schema
    from defectscope.batch.sinks import ParquetSink

    rows = [
        {
            "path": f"/archive/line-{i % 7}/2026-11-30/cell{i:09d}.png",
            "score": 20.0 + i % 97 / 7,
            "judgement": i % 2,
            "threshold": 30.8,
            "normalized_score": 0.8,
            "error": None,
            "heatmap": None,
            "model_checksum": "d" * 64,
        }
        for i in range(n)
    ]
    blocks = [pa.Table.from_pylist(rows[i : i + 1024], schema=arrow_schema()) for i in range(0, n, 1024)]
    out = work / "driver.parquet"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    sink = ParquetSink(out, model={"checksum": "d" * 64}, resume=False, force=False)
    for block in blocks:
        sink.write(block.to_pylist())
    sink.close("complete", {})
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.glob("part-*.parquet"))
    return {
        "rows": n,
        "seconds": round(seconds, 2),
        "rows_per_s": round(n / seconds),
        "parquet_bytes_per_row": round(size / n, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", type=Path, default=HERE / ".batch-data")
    parser.add_argument("--reuse-runs", action="store_true", help="take runs saved in --work instead of rerunning them")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(SRC), os.environ.get("PYTHONPATH")] if p)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    print(hardware_line())
    report: dict = {"load_average_before": load_average(), "cores": cores, "images": args.images}
    model = model_file(args.work)
    paths = cell_paths(args.images)
    listing = args.work / "cells.txt"
    listing.write_text("\n".join(paths) + "\n")
    report["runs"] = {
        "local": timed_run(
            "local", args.work, args.reuse_runs, model, listing, batch_size=args.batch_size, threads=cores
        )
    }
    print("local", report["runs"]["local"], file=sys.stderr, flush=True)
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    report["ray_init_s"] = round(time.perf_counter() - start, 2)
    for workers in (1, 2):
        report["runs"][f"ray_{workers}"] = timed_run(
            f"ray_{workers}",
            args.work,
            args.reuse_runs,
            model,
            listing,
            engine="ray",
            workers=workers,
            threads=1,
            batch_size=args.batch_size,
        )
        print(f"ray {workers}", report["runs"][f"ray_{workers}"], file=sys.stderr, flush=True)
    last = report["runs"]["ray_2"]
    report["block_overhead"] = block_overhead(last["blocks"], last["block_rows"], 2)
    ray.shutdown()
    report["driver"] = driver_ceiling(args.work)
    report["load_average_after"] = load_average()

    # on paper, from the per-core rate (Ray, 1 worker = 1 core)
    per_core = report["runs"]["ray_1"]["images_per_s"]
    need = 10_000_000 / 86_400
    file_bytes = sum(Path(p).stat().st_size for p in paths) / len(paths)
    report["paper"] = {
        "images_per_s_needed": round(need, 1),
        "per_core_images_per_s": per_core,
        "cores_at_full_use": math.ceil(need / per_core),
        "cores_at_70_percent": math.ceil(need / per_core / 0.7),
        "mean_image_bytes": round(file_bytes),
        "model_bytes": model.stat().st_size,
        "path_bytes": round(sum(len(p.encode()) for p in paths) / len(paths)),
        "row_bytes_parquet": report["driver"]["parquet_bytes_per_row"],
        "driver_ceiling_images_per_s": report["driver"]["rows_per_s"],
    }
    (args.work / "bench_batch.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(
        "\n| run | images/s | s in all | first row after (s) | load average before / after |\n|---|---:|---:|---:|---|"
    )
    for name, run in report["runs"].items():
        print(
            f"| {name} | {run['images_per_s']} | {run['seconds']} | {run['first_row_s']} | "
            f"{run['load_before']} / {run['load_after']} |"
        )


if __name__ == "__main__":
    main()
