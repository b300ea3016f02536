"""Append-only store of (rows, D) float32 features, kept in a temporary file instead of memory.

PatchCore and PaDiM stream their training features through it. PatchCore sees every patch of
every training image twice: once to choose the coreset, once to score each training image
without its own patches. Holding all of them in memory costs
N images x h x w x D x 4 bytes (1,500 images x 1,024 patches x 152 dims = 0.93 GB) on top of the
copies made while concatenating. The store writes each batch to an unlinked temporary file as it
arrives and reads back only what a step needs: all rows (exact coreset), chosen rows (approximate
coreset) or a contiguous run of rows (one chunk of images at a time). PaDiM reads the same
stretch of positions from every image (:meth:`FeatureStore.read_runs`). Values are stored
bit-exactly; the operating system's page cache, not the process, holds the file.

Writes happen in a background thread by default, so the caller extracts the next batch while the
kernel copies the last one out (PaDiM writes 2.9 MB per image; at 1,500 images the writes took
10 s of a 60 s fit when done in line). At most ``max_pending`` batches wait, so memory stays
bounded; any read first waits for the pending writes, and a write that failed (disk full, say)
is raised by the next append, read or :meth:`FeatureStore.flush`.
"""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ..errors import DefectscopeError

__all__ = ["FeatureStore"]


class FeatureStore:
    """Rows of ``dim`` float32 values appended batch by batch and read back by position.

    The file lives in ``directory`` (default: the system temporary folder, which honours
    ``TMPDIR``) and is unlinked at creation, so it disappears when the store is closed or the
    process ends, however it ends. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        dim: int,
        directory: str | Path | None = None,
        read_block_rows: int = 65536,
        background: bool = True,
        max_pending: int = 2,
    ) -> None:
        if dim < 1:
            raise DefectscopeError(f"feature dimension must be >= 1, got {dim}")
        if max_pending < 1:
            raise DefectscopeError(f"max_pending must be >= 1, got {max_pending}")
        self.dim = dim
        self.read_block_rows = read_block_rows
        self.background = background
        self._pending: queue.Queue = queue.Queue(maxsize=max_pending)
        self._writer: threading.Thread | None = None
        self._error: DefectscopeError | None = None
        self._rows = 0
        self._row_bytes = 4 * dim
        self._directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        try:
            # held for the store's life, closed by close(); unnamed, so the OS frees it even after a crash
            self._file: IO[bytes] | None = tempfile.TemporaryFile(dir=self._directory, buffering=0)  # noqa: SIM115
        except OSError as exc:
            raise DefectscopeError(
                f"cannot create a temporary feature file in {self._directory} ({exc.strerror}); "
                "set TMPDIR to a writable folder"
            ) from exc

    # ------------------------------------------------------------------ writing
    def append(self, rows: torch.Tensor) -> None:
        """Append (r, dim) rows (copied as contiguous float32; the caller may reuse ``rows`` at once)."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise DefectscopeError(f"expected (rows, {self.dim}) features, got {tuple(rows.shape)}")
        handle = self._handle()
        self._raise_failed_write()
        data = np.array(rows.detach().to(torch.float32).numpy(), dtype=np.float32, order="C", copy=True)
        offset = self._rows * self._row_bytes
        self._rows += rows.shape[0]
        if not self.background:
            try:
                self._write(handle.fileno(), offset, data)
            except DefectscopeError as exc:
                self._error = exc  # the store now lacks rows: every later call says so
                raise
            return
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_pending, args=(handle.fileno(),), name="defectscope-feature-store", daemon=True
            )
            self._writer.start()
        self._pending.put((offset, data))

    def flush(self) -> None:
        """Wait until every appended row is in the file; raises the error of a write that failed."""
        if self._writer is not None:
            self._pending.join()
        self._raise_failed_write()

    def _write(self, fd: int, offset: int, data: np.ndarray) -> None:
        view = data.data.cast("B")
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            done = offset // self._row_bytes
            raise DefectscopeError(
                f"writing training features to {self._directory} failed ({exc.strerror}) after "
                f"{offset / 2**20:.0f} MiB; about {self._rows * self._row_bytes / 2**20:.0f} MiB are needed so far "
                f"({done} of {self._rows} rows written): free disk space or set TMPDIR to a folder with more room"
            ) from exc

    def _write_pending(self, fd: int) -> None:
        """The writer thread: write queued (offset, data) until the None sentinel; keep the first error."""
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, drain the queue without writing
                    try:
                        self._write(fd, *item)
                    except DefectscopeError as exc:
                        self._error = exc
                    except Exception as exc:
                        self._error = DefectscopeError(f"writing training features to {self._directory} failed: {exc}")
            finally:
                self._pending.task_done()

    def _raise_failed_write(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        """Bytes the stored rows take (on disk, and in memory if all were read)."""
        return self._rows * self._row_bytes

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as a new (stop - start, dim) float32 tensor."""
        stop = self._rows if stop is None else stop
        if not 0 <= start <= stop <= self._rows:
            raise DefectscopeError(f"rows {start}:{stop} are outside the store's {self._rows} rows")
        out = torch.empty(stop - start, self.dim, dtype=torch.float32)
        self._read_into(out, start, self._readable())
        return out

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows at ``indices`` ((K,) integer, ascending) as a (K, dim) tensor, reading block by block."""
        indices = indices.to(torch.int64)
        if indices.numel() and (indices[0] < 0 or indices[-1] >= self._rows):
            raise DefectscopeError(
                f"row indices must lie in [0, {self._rows}), got {int(indices[0])}..{int(indices[-1])}"
            )
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise DefectscopeError("gather needs strictly ascending row indices")
        out = torch.empty(indices.numel(), self.dim, dtype=torch.float32)
        done = 0
        while done < indices.numel():
            first = int(indices[done])
            stop = min(first + self.read_block_rows, self._rows)
            upto = done + int(torch.searchsorted(indices[done:], stop))
            block = self.read(first, int(indices[upto - 1]) + 1)
            out[done:upto] = block[indices[done:upto] - first]
            done = upto
        return out

    def read_runs(self, starts: Sequence[int], length: int) -> torch.Tensor:
        """Runs of ``length`` rows beginning at each of ``starts``, as an (R, length, dim) tensor.

        E.g. the same stretch of positions from every image of an image-major store: with P rows
        per image, ``read_runs([i * P + lo for i in range(n)], hi - lo)``. Each run is read
        straight into its slice of the result.
        """
        if length < 0:
            raise DefectscopeError(f"run length must be >= 0, got {length}")
        out = torch.empty(len(starts), length, self.dim, dtype=torch.float32)
        fd = self._readable()  # one wait for pending writes, not one per run
        for r, start in enumerate(starts):
            start = int(start)
            if not 0 <= start <= start + length <= self._rows:
                raise DefectscopeError(f"rows {start}:{start + length} are outside the store's {self._rows} rows")
            self._read_into(out[r], start, fd)
        return out

    def _readable(self) -> int:
        """The file descriptor, once every pending write is in the file (raises a failed write)."""
        fd = self._handle().fileno()
        self.flush()
        return fd

    def _read_into(self, out: torch.Tensor, start: int, fd: int) -> None:
        if out.numel() == 0:
            return
        offset = start * self._row_bytes
        view = out.numpy().data.cast("B")
        while view:
            got = os.preadv(fd, [view], offset)
            if not got:
                raise DefectscopeError("the temporary feature file ended early (was it removed or truncated?)")
            view, offset = view[got:], offset + got

    # ------------------------------------------------------------------ lifetime
    def _handle(self) -> IO[bytes]:
        if self._file is None:
            raise DefectscopeError("the feature store is closed")
        return self._file

    def close(self) -> None:
        """Stop the writer, drop unwritten rows and delete the file (idempotent)."""
        writer = getattr(self, "_writer", None)  # absent when __init__ failed
        if writer is not None:
            self._error = self._error or DefectscopeError("the feature store was closed")  # skip queued writes
            self._pending.put(None)
            writer.join()
            self._writer = None
        handle = getattr(self, "_file", None)
        if handle is not None:
            handle.close()
            self._file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if sys.is_finalizing():  # at interpreter exit the writer thread may be frozen: do not wait for it
            handle = getattr(self, "_file", None)
            if handle is not None:
                handle.close()
            return
        self.close()

    def __repr__(self) -> str:
        return f"FeatureStore(rows={self._rows}, dim={self.dim}, {self.nbytes / 2**20:.1f} MiB in {self._directory})"
