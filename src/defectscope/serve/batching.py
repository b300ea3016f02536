"""Models by name, each with a dynamic micro-batcher.

Requests for one model wait in its queue; the batcher takes the first, waits up to
``max_wait_ms`` for more (up to ``max_batch``), and scores them with one ``Model.predict(list)``
call in a worker thread, so the event loop keeps accepting requests meanwhile. The API scores an
image the same alone or in a batch (to float32 rounding), and an image it cannot use becomes a
result with an error, so one bad request never spoils the others of its batch.

Reload loads the new model completely, then swaps the slot's reference: a batch already running
finishes on the model it started with, the next one uses the new model, and a failed load leaves
the old one in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import defectscope

from ..errors import DefectscopeError
from .metrics import Metrics

log = logging.getLogger("defectscope.serve")


def warm_up(model: defectscope.Model) -> defectscope.Model:
    """Score one blank image, so the first request does not pay for building the network."""
    height, width = model.detector.input_shape  # any size would do: the photo is resized to the model input
    model.predict(np.zeros((height, width, 3), np.uint8), maps=False)
    return model


def load_warm(path: Path, runtime: str | None = None) -> defectscope.Model:
    """:func:`defectscope.load` (checksum verified, nothing unpickled) on ``runtime`` (None or "torch":
    PyTorch; "onnxruntime" / "openvino": the model's export, made once; "auto": onnxruntime when the
    model can be exported, else PyTorch), then :func:`warm_up`."""
    return warm_up(defectscope.load(path, runtime=runtime))


class QueueFull(Exception):
    """The model's queue already holds ``max_queue`` requests."""


@dataclass
class Job:
    """One request's image waiting to be scored; ``future`` gets (Result, batch size). ``threshold_name``:
    judge at the model's threshold of that name (None: the active one)."""

    image: Any
    maps: bool
    future: asyncio.Future = field(repr=False)
    threshold_name: str | None = None


class ModelSlot:
    """A model under a name: the current :class:`defectscope.Model`, its file, and its batcher."""

    def __init__(
        self,
        name: str,
        model: defectscope.Model,
        metrics: Metrics,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
    ) -> None:
        self.name = name
        self.model = model
        self.path: Path | None = model.path
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._reload_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Start the batcher on the running event loop."""
        self._wakeup = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")
        self.metrics.queue_depth.labels(self.name).set(0)

    async def stop(self) -> None:
        """Stop the batcher; requests still waiting are told the server is shutting down."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ scoring
    def submit(self, image: Any, maps: bool, threshold_name: str | None = None) -> asyncio.Future:
        """Queue one decoded image; the future resolves to (Result, batch size), judged at the model's
        threshold named ``threshold_name`` (None: the active one). Raises QueueFull, and DefectscopeError
        for a name the model does not have (listing the names it has)."""
        if threshold_name is not None:
            self.model.named_threshold(threshold_name)
        if len(self._pending) >= self.max_queue:
            raise QueueFull(
                f"model {self.name!r} has {len(self._pending)} requests waiting, the server's limit "
                "(--max-queue); retry shortly"
            )
        job = Job(image, maps, asyncio.get_running_loop().create_future(), threshold_name)
        self._pending.append(job)
        self.metrics.queue_depth.labels(self.name).set(len(self._pending))
        assert self._wakeup is not None, "ModelSlot.start() was not called"
        self._wakeup.set()
        return job.future

    async def _wait_for_jobs(self, timeout: float | None) -> bool:
        """Wait until a job is queued (True) or ``timeout`` seconds pass (False)."""
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait_for_jobs(None)
            deadline = loop.time() + self.max_wait_s
            while len(self._pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._wait_for_jobs(remaining):
                    break
            jobs = []
            while self._pending and len(jobs) < self.max_batch:
                job = self._pending.popleft()
                if not job.future.done():  # a request that timed out while waiting is not scored
                    jobs.append(job)
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))
            if jobs:
                await self._score(jobs)

    async def _score(self, jobs: list[Job]) -> None:
        model = self.model  # this batch finishes on this model even if a reload swaps the slot's meanwhile
        maps = any(job.maps for job in jobs)
        self.metrics.batch_size.labels(self.name).observe(len(jobs))
        try:
            results = await asyncio.to_thread(
                model.predict, [job.image for job in jobs], maps=maps, batch_size=len(jobs)
            )
        except Exception as exc:  # a bug, not a bad image (those come back as results): fail this batch only
            log.exception("model %s: scoring a batch of %d failed", self.name, len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results):
            if job.future.done():
                continue
            if job.threshold_name is None:
                job.future.set_result((result, len(jobs)))
                continue
            try:  # the batch is scored once; each request is judged at its own named threshold of this model
                job.future.set_result((result.at_threshold(model.named_threshold(job.threshold_name)), len(jobs)))
            except DefectscopeError as exc:  # a reload between submit and scoring dropped the name
                job.future.set_exception(exc)

    # ------------------------------------------------------------------ reload
    async def reload(self) -> defectscope.Model:
        """Load the model file again (fully, and warmed up, in a worker thread) and swap it in. Raises
        DefectscopeError (the old model stays) when the file cannot be loaded."""
        if self.path is None:
            raise DefectscopeError(f"model {self.name!r} was not loaded from a file: nothing to reload")
        assert self._reload_lock is not None
        async with self._reload_lock:
            try:
                model = await asyncio.to_thread(load_warm, self.path, self.model.requested_runtime)
            except Exception:
                self.metrics.reloads.labels(self.name, "failed").inc()
                raise
            self.model = model
            self.metrics.reloads.labels(self.name, "ok").inc()
            log.info(
                "reloaded model=%s checksum=%s runtime=%s (%s)",
                self.name,
                model.checksum,
                model.runtime or "torch",
                model.runtime_reason,
            )
            return model
