"""`defectscope serve` under load on loopback: requests/s, latency percentiles and mean batch size
at 1, 4, 16 and 32 concurrent clients (--concurrency), with micro-batching off (--max-batch 1) and on (8).

    python benchmarks/bench_serve.py                       # bottle model (fitted once, cached), else synthetic
    python benchmarks/bench_serve.py --model my.dsmodel --images DIR --requests 200 --seconds 30

The server runs as a `defectscope serve` subprocess on 127.0.0.1 (a free port); the clients are
asyncio + httpx in this process, each sending one image after another (bottle's test images,
good and defective, preloaded as PNG bytes). Traffic per cell is bounded by --requests and
--seconds, whichever comes first, after a few warm-up requests. The mean batch size comes from
the server's /metrics. Client and server share the machine's cores. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from machine import BOTTLE, hardware_line

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".serve-data"


def bench_model(model: Path | None) -> tuple[Path, list[Path], str]:
    """(model file, images to send, what they are): the given model, else a bottle model (PatchCore
    defaults on 60 training images, fitted once into benchmarks/.serve-data), else a synthetic one."""
    import defectscope

    if BOTTLE.is_dir():
        images = sorted((BOTTLE / "test").rglob("*.png"))[::4]
        what = f"bottle test images ({len(images)}, 900 x 900 PNG, good and defective)"
        if model is None:
            model = CACHE / "bottle-60.dsmodel"
            if not model.exists():
                CACHE.mkdir(exist_ok=True)
                print(f"fitting {model} (PatchCore defaults, 60 bottle training images) ...", flush=True)
                defectscope.fit(sorted((BOTTLE / "train" / "good").glob("*.png"))[:60]).save(model)
        return model, images, what
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic import make_mvtec_category

    root = make_mvtec_category(Path(tempfile.mkdtemp(prefix="bench-serve-")), n_train=24, size=256, seed=0)
    images = sorted((root / "test").rglob("*.png"))
    if model is None:
        model = root / "synthetic.dsmodel"
        defectscope.fit(root).save(model)
    return model, images, f"synthetic images ({len(images)}, 256 x 256; bottle not found at {BOTTLE})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [
        sys.executable,
        "-m",
        "defectscope.cli",
        "serve",
        f"{model}=bench",
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-wait-ms",
        str(max_wait_ms),
        "--max-queue",
        "1024",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("serve did not become ready within 300 s")


def batch_totals(url: str) -> tuple[float, float]:
    """(images scored, forward passes) so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    total = {"defectscope_batch_size_sum": 0.0, "defectscope_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name in total:
                total[sample.name] += sample.value
    return total["defectscope_batch_size_sum"], total["defectscope_batch_size_count"]


async def traffic(
    url: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float
) -> tuple[list[float], float, int]:
    """(latencies in s of the 200 answers, wall seconds, answers other than 200)."""
    latencies: list[float] = []
    failures = 0
    sent = 0
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency + 2)
    ) as http:

        async def client(c: int) -> None:
            nonlocal sent, failures
            while sent < requests and time.perf_counter() < stop_at:
                body = bodies[(sent + c) % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                answer = await http.post("/v1/models/bench/predict", content=body)
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(concurrency)))
        return latencies, time.perf_counter() - start, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model file (default: bottle, else synthetic)")
    parser.add_argument("--requests", type=int, default=160, help="most requests per cell (default 160)")
    parser.add_argument("--seconds", type=float, default=25.0, help="most seconds per cell (default 25)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()

    model, images, what = bench_model(args.model)
    bodies = [p.read_bytes() for p in images]
    print(hardware_line())
    print(
        f"model: {model.name}; images: {what}; per cell at most {args.requests} requests or {args.seconds:g} s; "
        f"--max-wait-ms {args.max_wait_ms:g}"
    )
    print()
    print("| --max-batch | clients | requests | requests/s | p50 ms | p95 ms | p99 ms | mean batch | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for max_batch in args.max_batch:
        proc, url = start_server(model, max_batch, args.max_wait_ms)
        try:
            asyncio.run(traffic(url, bodies, 2, 4, 60))  # warm-up
            for concurrency in args.concurrency:
                images_before, batches_before = batch_totals(url)
                latencies, wall, failures = asyncio.run(traffic(url, bodies, concurrency, args.requests, args.seconds))
                images_after, batches_after = batch_totals(url)
                mean_batch = (images_after - images_before) / max(batches_after - batches_before, 1)
                ms = 1000 * np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
                print(
                    f"| {max_batch} | {concurrency} | {len(latencies) + failures} | {len(latencies) / wall:.1f} | "
                    f"{ms[0]:.0f} | {ms[1]:.0f} | {ms[2]:.0f} | {mean_batch:.2f} | {failures} |",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            if code != 0:
                print(f"(serve exited with {code} after SIGTERM)")
    print()
    print(hardware_line())


if __name__ == "__main__":
    main()
