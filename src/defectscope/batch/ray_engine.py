"""The Ray engine: Ray Data reads the path list, an actor pool scores it, the driver writes the rows.

    paths (driver) -> ray.data.from_arrow(blocks of paths)
      -> map_batches(BatchScorer, compute=ActorPoolStrategy(size=workers))   one model per actor
      -> iter_batches on the driver -> the sink (Parquet parts + manifest, or CSV)

The model file's bytes are put in Ray's object store once; each actor writes them to a temporary
file, loads them with :func:`defectscope.load` (which verifies the checksum written in the file)
and checks that the checksum is the driver's, so a worker never scores with another model. The
images are read by the workers: on a cluster the paths must resolve on every node (a shared file
system), and so must ``--heatmaps``. Actors are restarted and their tasks retried when a worker
process dies (``max_restarts``/``max_task_retries`` -1); the driver writes each returned block
once and the sink drops any path it has already written, so a retry never duplicates a row.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import DefectscopeError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'defectscope[ray]'"


def require_ray() -> None:
    """Fail at once, in one line, when Ray Data or pyarrow is not installed."""
    import importlib.util

    missing = [name for name in ("ray", "pyarrow", "pandas") if importlib.util.find_spec(name) is None]
    if missing:
        raise DefectscopeError(f"--engine ray needs Ray Data ({', '.join(missing)} not installed): {INSTALL_HINT}")


class BatchScorer:
    """The actor: loads the model once, then scores blocks of paths (a pyarrow table with a ``path``
    column) into blocks of rows with the same code as the local engine."""

    def __init__(
        self,
        model: Any,
        checksum: str | None,
        threshold: float,
        batch_size: int,
        heatmaps: str | None,
        threads: int,
        runtime: str | None = None,
    ) -> None:
        import ray
        import torch

        import defectscope

        from ..export import set_threads

        torch.set_num_threads(threads)
        set_threads(threads)  # onnxruntime / OpenVINO threads, for a runtime
        data = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        with tempfile.TemporaryDirectory(prefix="defectscope-batch-") as tmp:
            path = Path(tmp) / "model.dsmodel"
            path.write_bytes(data)
            # verifies the sha256 written in the file; a runtime's export is the one the driver made into
            # this machine's cache (keyed by that sha256), made here once on another machine
            self.model = defectscope.load(path, runtime=runtime)
        if self.model.checksum != checksum:
            raise DefectscopeError(
                f"worker on {socket.gethostname()}: the model's checksum {self.model.checksum} "
                f"is not the driver's {checksum}"
            )
        self.threshold = threshold
        self.batch_size = batch_size
        self.heatmaps = Path(heatmaps) if heatmaps is not None else None

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from .local import score_local
        from .rows import arrow_schema

        paths = batch.column("path").to_pylist()
        rows = list(
            score_local(self.model, paths, threshold=self.threshold, batch_size=self.batch_size, heatmaps=self.heatmaps)
        )
        return pa.Table.from_pylist(rows, schema=arrow_schema())


def block_rows(n_paths: int, workers: int, batch_size: int) -> int:
    """Paths per Ray block (one actor call): about 8 blocks per worker so that the last ones balance,
    at most 8 model batches, and always a multiple of the batch size."""
    per_block = min(batch_size * 8, max(1, math.ceil(n_paths / (workers * 8))))
    return max(batch_size, math.ceil(per_block / batch_size) * batch_size)


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Run the body in a Ray session: this process's own when there is one, else ``ray.init(address)``
    (None: a cluster started on this machine by ``ray start``, else a private local one; "auto" or
    "HOST:PORT": that cluster), shut down at the end. Connection problems are one-line errors."""
    require_ray()
    import ray

    if ray.is_initialized():
        yield
        return
    where = address or "this machine"
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        hint = ""
        if address not in (None, "auto") and os.environ.get("RAY_AUTH_MODE") != "token":
            hint = " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token)"
        raise DefectscopeError(f"cannot reach the Ray cluster at {where}: {exc}{hint}") from exc
    except Exception as exc:
        if "auth" in type(exc).__name__.lower() or "InvalidAuthToken" in str(exc):
            raise DefectscopeError(
                f"the Ray cluster at {where} wants its token: run with RAY_AUTH_MODE=token and the cluster's token "
                "in ~/.ray/auth_token (or RAY_AUTH_TOKEN)"
            ) from exc
        raise
    try:
        yield
    finally:
        ray.shutdown()


def score_ray(
    model_path: Path,
    checksum: str | None,
    paths: list[str],
    *,
    threshold: float,
    workers: int | None = None,
    threads: int = 1,
    batch_size: int = 16,
    heatmaps: Path | None = None,
    progress: bool = False,
    info: dict[str, Any] | None = None,
    runtime: str | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Yield the rows of ``paths`` block by block, in no fixed order, scored on the Ray cluster of this
    process's session (see :func:`ray_session`). ``workers``: actors in the pool (default: the
    cluster's CPUs / ``threads``); ``threads``: CPUs (torch threads) per actor. ``info`` (a dict)
    receives the address, the worker count and the blocks. ``runtime``: what every worker scores with
    (None: torch; "onnxruntime" / "openvino": the model's export), never "auto", so all agree."""
    require_ray()
    import pyarrow as pa
    import ray
    import ray.data

    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = workers or max(1, cpus // threads)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    if not progress:  # Ray Data's INFO lines are its progress report: off with the bars
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    size = block_rows(len(paths), workers, batch_size)
    blocks = [pa.table({"path": pa.array(paths[i : i + size], pa.string())}) for i in range(0, len(paths), size)]
    if info is not None:
        info.update(
            address=ray.get_runtime_context().gcs_address,
            workers=workers,
            threads=threads,
            cluster_cpus=cpus,
            blocks=len(blocks),
            block_rows=size,
        )
    if not blocks:
        return
    model_ref = ray.put(Path(model_path).read_bytes())
    with warnings.catch_warnings():  # Ray >= 2.51 calls these "ray_remote_args" and warns; older ones need them
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = ray.data.from_arrow(blocks).map_batches(
            BatchScorer,
            batch_size=None,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
            fn_constructor_kwargs={
                "model": model_ref,
                "checksum": checksum,
                "threshold": threshold,
                "batch_size": batch_size,
                "heatmaps": str(heatmaps) if heatmaps else None,
                "threads": threads,
                "runtime": runtime,
            },
            max_restarts=-1,
            max_task_retries=-1,  # a dead worker is restarted and its block retried
        )
    try:
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table.to_pylist()
    except ray.exceptions.RayError as exc:
        raise DefectscopeError(f"the Ray job failed: {_cause(exc)}") from exc


def _cause(exc: BaseException) -> str:
    """The last ``SomethingError: message`` line of a Ray error (the worker's own exception), else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.findall(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$", text, flags=re.M)
    if found:
        name, message = found[-1]
        return f"{name}: {message.strip()}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
