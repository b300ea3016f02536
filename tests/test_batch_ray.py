"""defectscope batch --engine ray on a local Ray cluster: the command line joining a running cluster
gives the local engine's rows (which are predict's), so does a run in which a worker is killed, and
the workers check the model's checksum."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'defectscope[ray]')")
pytest.importorskip("ray.data")

from batch_data import batch_data  # noqa: E402

import defectscope  # noqa: E402
from defectscope.batch import run_batch  # noqa: E402
from defectscope.batch.ray_engine import score_ray  # noqa: E402
from defectscope.batch.sinks import read_output  # noqa: E402
from defectscope.errors import DefectscopeError  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
WORKER_TITLE = b"ray::MapWorker(MapBatches(BatchScorer))"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (2 CPUs); its workers import this checkout."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(SRC), saved] if p)  # the workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return batch_data(tmp_path_factory)


@pytest.fixture(scope="module")
def local_rows(data, tmp_path_factory):
    """The local engine's rows (equal to predict's: tests/test_batch.py) for the test images and two bad paths."""
    out = tmp_path_factory.mktemp("local") / "scores.parquet"
    run_batch(data["model"], _inputs(data), out)
    return {r["path"]: r for r in read_output(out)}


def _inputs(data) -> list[str]:
    return [str(data["category"] / "test"), str(data["broken"]), str(data["root"] / "missing.png")]


def _our_workers() -> list[int]:
    """Process ids of this test's scoring actors: their title names the actor, and this process started
    the cluster (raylet), whose children they are."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            grandparent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(WORKER_TITLE) and grandparent == os.getpid():
            found.append(int(entry))
    return found


def _same_rows(rows: list[dict], local_rows: dict[str, dict]) -> None:
    assert sorted(r["path"] for r in rows) == sorted(local_rows)  # every path once, in any order
    for row in rows:
        want = local_rows[row["path"]]
        # one torch thread per actor here, two in the local run: float32 sums may round differently
        assert (
            row["score"] == pytest.approx(want["score"], rel=1e-5, abs=0)
            if want["score"] is not None
            else row["score"] is None
        )
        assert (row["judgement"], row["threshold"], row["model_checksum"]) == (
            want["judgement"],
            want["threshold"],
            want["model_checksum"],
        )
        assert (row["error"] is None) == (want["error"] is None)


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost_or_doubled(cluster, data, local_rows, tmp_path):
    out = tmp_path / "scores.csv"
    killed: list[int] = []

    def kill_one_worker(rows_so_far: int) -> None:
        if not killed and rows_so_far > 2:  # the first block is in: the others are being scored
            workers = _our_workers()
            assert workers, "no scoring actor found"
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    summary = run_batch(
        data["model"], _inputs(data), out, engine="ray", workers=2, batch_size=2, on_rows=kill_one_worker
    )
    assert killed, "the run ended before a worker could be killed"
    assert summary.engine_info["workers"] == 2 and summary.engine_info["blocks"] >= 4
    _same_rows(read_output(out), local_rows)  # complete, each path once, the local engine's scores
    assert (summary.scored, summary.errors) == (len(local_rows), 2)


def test_a_worker_refuses_a_model_with_another_checksum(cluster, data):
    with pytest.raises(DefectscopeError, match="checksum .* is not the driver's"):
        list(score_ray(data["model"], "0" * 64, [str(data["images"][0])], threshold=1.0, workers=1))


def test_the_command_line_joins_a_running_cluster_by_address(cluster, data, local_rows, tmp_path):
    out = tmp_path / "scores.csv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    args = [
        sys.executable,
        "-m",
        "defectscope.cli",
        "batch",
        str(data["model"]),
        *_inputs(data),
        "-o",
        str(out),
        "--engine",
        "ray",
        "--address",
        cluster,
        "--workers",
        "2",
        "--batch-size",
        "4",
    ]
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]  # the two bad paths
    assert f"wrote {out}: {len(local_rows)} row(s), 2 with an error" in run.stdout
    _same_rows(read_output(out), local_rows)
    assert defectscope.load(data["model"]).checksum in out.read_text()
