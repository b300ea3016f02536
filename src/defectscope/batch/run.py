"""One batch run: check everything that can be checked, expand the inputs, drop what OUT already
holds (``--resume``), score with the chosen engine, stream the rows into the sink."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import DefectscopeError
from .inputs import expand_inputs
from .rows import error_row
from .sinks import check_output, exclusive, open_sink

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass
class BatchSummary:
    """What a run did. ``scored`` and ``errors`` count this run's rows (errors included in scored);
    ``skipped`` the input paths already in OUT; ``duplicates`` rows dropped because their path was
    written already (a retried Ray task); ``total_rows`` what OUT holds now."""

    out: Path
    kind: str
    engine: str
    inputs: int = 0
    skipped: int = 0
    scored: int = 0
    errors: int = 0
    duplicates: int = 0
    total_rows: int = 0
    seconds: float = 0.0
    engine_info: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def run_batch(
    model_path: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    *,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    batch_size: int = 16,
    threshold: float | None = None,
    threshold_name: str | None = None,
    heatmaps: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    part_rows: int = 10_000,
    flush_seconds: float = 30.0,
    runtime: str = "auto",
    progress: bool = False,
    notify: Callable[[str], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> BatchSummary:
    """Score every image of ``inputs`` with the model at ``model_path`` into ``out`` (see
    :mod:`defectscope.batch`). Raises DefectscopeError, before any scoring, for a bad output, a
    model that cannot be loaded, options that do not fit the engine, or no input at all.

    ``notify`` gets one line before the scoring starts; ``on_rows`` the number of rows written in
    this run so far, after each write (a progress hook).

    ``threshold`` (a number) or ``threshold_name`` (one of the model's named thresholds,
    :attr:`defectscope.Model.thresholds`) judges instead of the model's active threshold; the value
    used (and its name) is recorded with the run, and a resumed OUT must have been judged at it.

    ``runtime``: see :func:`defectscope.api.choose_runtime`; "auto" (default) scores an exportable
    model with its onnxruntime export, made once into the cache here before any worker starts, and
    every Ray worker then loads that same runtime. The runtime used is recorded in the run's entry
    of the manifest (Parquet) and said through ``notify``."""
    out = Path(out)
    heatmaps = Path(heatmaps) if heatmaps is not None else None
    if engine not in ENGINES:
        raise DefectscopeError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if resume and force:
        raise DefectscopeError("--resume and --force exclude each other: continue OUT, or replace it")
    if threshold is not None and threshold_name is not None:
        raise DefectscopeError("--threshold and --threshold-name exclude each other: give a number or a name")
    if engine == "local" and (workers is not None or address is not None):
        raise DefectscopeError(
            "--workers and --address are for --engine ray; the local engine uses this process "
            "(--threads sets its torch threads)"
        )
    if engine == "ray":
        from .ray_engine import require_ray

        require_ray()
    kind = check_output(out, resume=resume, force=force)
    if heatmaps is not None:
        from ..common.files import check_output_dir

        check_output_dir(heatmaps, "heatmap folder")
    import defectscope

    model = defectscope.load(model_path, runtime=runtime)  # "auto": the export is made here, once
    used_runtime = model.runtime or "torch"
    if threshold_name is not None:
        threshold = model.named_threshold(threshold_name)  # an unknown name lists the model's names
    elif threshold is None:  # the active threshold, recorded with its name
        threshold, threshold_name = model.threshold, model.threshold_name
    threshold = float(threshold)
    entries = list(expand_inputs(inputs, exclude=heatmaps))
    if not entries:
        raise DefectscopeError("no images to score (INPUT named nothing)")
    described = {"path": str(model_path), "checksum": model.checksum, "method": model.method, "threshold": threshold}
    if threshold_name is not None:
        described["threshold_name"] = threshold_name
    with ExitStack() as stack:
        if engine == "ray":  # joined before OUT is touched: a cluster that cannot be reached is an error first
            from .ray_engine import ray_session

            stack.enter_context(ray_session(address))
        stack.enter_context(exclusive(out))  # before OUT is read or written: two runs never interleave parts
        sink = open_sink(
            out, kind, model=described, resume=resume, force=force, part_rows=part_rows, flush_seconds=flush_seconds
        )
        # runs from before the runtime was recorded were torch's; a killed run's runtime is not known
        earlier = sorted(
            {r.get("runtime", "torch") for r in getattr(sink, "runs", []) if r.get("status") != "killed"}
            - {used_runtime}
        )
        if resume and earlier:  # scores agree within 1e-4 relative across runtimes (README), but say it
            log.warning(
                "%s: earlier runs scored with %s, this one with %s (scores agree within 1e-4 relative; "
                "--runtime %s keeps one runtime)",
                out,
                ", ".join(earlier),
                used_runtime,
                earlier[0],
            )
        summary = BatchSummary(out=out, kind=kind, engine=engine, inputs=len(entries))
        todo = [e for e in entries if sink.key(e.path) not in sink.paths]
        summary.skipped = len(entries) - len(todo)
        if notify is not None:
            already = f", {summary.skipped} already in {out}" if summary.skipped else ""
            on = model.runtime_reason if runtime == "auto" else used_runtime
            notify(f"{len(todo)} image(s) to score with --engine {engine} on {on}{already}")
        started, clock = datetime.now(timezone.utc), time.perf_counter()
        status = "interrupted"
        try:
            paths = [e.path for e in todo if e.error is None]
            if engine == "local":
                from .local import score_local

                scored = score_local(
                    model, paths, threshold=threshold, batch_size=batch_size, heatmaps=heatmaps, progress=progress
                )
                for entry in todo:  # in input order, an argument that gave no image in its place (as predict)
                    sink.write(
                        [
                            next(scored)
                            if entry.error is None
                            else error_row(entry.path, entry.error, threshold, model.checksum)
                        ]
                    )
                    if on_rows is not None:
                        on_rows(sink.rows)
                summary.engine_info = {"threads": threads, "runtime": used_runtime}
            else:
                from .ray_engine import score_ray

                sink.write([error_row(e.path, e.error, threshold, model.checksum) for e in todo if e.error is not None])
                del model  # the driver only needed its checksum, threshold and runtime (and made the export)
                summary.engine_info["runtime"] = used_runtime
                for rows in score_ray(
                    Path(model_path),
                    described["checksum"],
                    paths,
                    threshold=threshold,
                    workers=workers,
                    threads=threads or 1,
                    batch_size=batch_size,
                    runtime=None if used_runtime == "torch" else used_runtime,
                    heatmaps=heatmaps,
                    progress=progress,
                    info=summary.engine_info,
                ):
                    sink.write(rows)
                    if on_rows is not None:
                        on_rows(sink.rows)
            status = "complete"
        finally:
            summary.seconds = time.perf_counter() - clock
            summary.scored, summary.errors, summary.duplicates = sink.rows, sink.errors, sink.duplicates
            summary.total_rows = sink.previous_rows + sink.rows
            sink.close(
                status,
                {
                    "started": started.isoformat(timespec="seconds"),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "status": status,
                    "engine": engine,
                    **summary.engine_info,
                    "inputs": summary.inputs,
                    "skipped": summary.skipped,
                    "rows": summary.scored,
                    "errors": summary.errors,
                    "duplicates_dropped": summary.duplicates,
                    "seconds": round(summary.seconds, 3),
                },
            )
        if summary.duplicates:
            log.warning(
                "%d duplicate row(s) dropped (a retried task returned paths already written)", summary.duplicates
            )
        return summary
