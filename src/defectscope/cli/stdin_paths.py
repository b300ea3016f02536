"""Paths from standard input, in batches of what has arrived: ``find ... | defectscope predict MODEL -``.

A producer (``find``, a camera script) may write paths slowly; each one must be scored as soon as it
arrives, not when a batch is full. :func:`available_batches` therefore hands over whatever has
arrived when the scorer is ready: at least one path, at most ``batch_size``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import BinaryIO

_END = object()


def read_paths(stream: BinaryIO, sep: bytes = b"\n") -> Iterator[str]:
    """Yield each path of ``stream`` (bytes), separated by ``sep`` (newline or NUL), as soon as its separator
    (or the end) is read. A trailing carriage return (``\\r\\n`` files) and empty entries are dropped;
    bytes that are not UTF-8 are kept as the file system gives them (``os.fsdecode``)."""
    pending = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(sep)
        for item in complete:
            path = _clean(item, sep)
            if path:
                yield path
    path = _clean(pending, sep)
    if path:
        yield path


def _clean(item: bytes, sep: bytes) -> str:
    if sep == b"\n" and item.endswith(b"\r"):
        item = item[:-1]
    return os.fsdecode(item) if item.strip() else ""


def available_batches(items: Iterator[str], batch_size: int) -> Iterator[list[str]]:
    """Lists of 1 to ``batch_size`` items: waits for the first, then takes what has already arrived.

    The items are read in a background thread, so a slow producer never holds back a batch that
    could be scored; the order is kept."""
    arrived: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for item in items:
                arrived.put(item)
        except BaseException as exc:
            arrived.put(exc)
        arrived.put(_END)

    threading.Thread(target=read, name="defectscope-stdin", daemon=True).start()
    done = False
    while not done:
        first = arrived.get()
        if first is _END:
            return
        if isinstance(first, BaseException):
            raise first
        batch = [first]
        while len(batch) < batch_size:
            try:
                item = arrived.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                done = True
                break
            if isinstance(item, BaseException):
                raise item
            batch.append(item)
        yield batch
