"""Where the rows go: a folder of Parquet parts plus a manifest, or one CSV file.

Both are streamed, resumable and safe against a kill at any instant:

* Parquet (``OUT`` ending in ``.parquet`` or with no ending): ``OUT/`` is a Parquet dataset
  (``pyarrow.dataset``, pandas, DuckDB and Spark read the folder as one table). Rows are buffered
  and committed as ``part-NNNNNN.parquet`` every ``part_rows`` rows or ``flush_seconds`` seconds:
  each part is written under a hidden temporary name, flushed to disk and renamed into place, so
  a part either exists whole or not at all. ``_manifest.json`` (written atomically at the start
  and the end of each run) names the model, the parts, the row and error counts and every run.
* CSV (``OUT`` ending in ``.csv``): a header, then one line per row, flushed as it is written. A
  kill can leave at most one incomplete last line; ``--resume`` cuts it off before appending.

Rows are keyed by ``path``: a sink never writes a path twice (a path already in OUT, or written
earlier in the run, is dropped and counted), which makes a resumed run and a retried Ray task
duplicate-free.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..common.files import OutputError, check_output_dir, check_output_file, new_file_mode, replacing
from .rows import COLUMNS

PARQUET_SUFFIXES = ("", ".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
MANIFEST = "_manifest.json"
FORMAT = "defectscope-batch/1"
_PART = re.compile(r"part-(\d{6,})\.parquet")
_OURS = re.compile(r"(part-\d{6,}\.parquet|\.part-\d{6,}\.parquet\..*\.tmp|_manifest\.json|\._manifest\.json\..*\.tmp)")
_HEADER = ",".join(COLUMNS)


def output_kind(out: Path) -> str:
    """ "parquet" or "csv" from OUT's ending; anything else is refused with what is allowed."""
    suffix = out.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise OutputError(
        f"{out}: unknown output type {out.suffix!r}: use .parquet (a folder of Parquet parts, the "
        "default) or .csv (one file)"
    )


def check_output(out: Path, *, resume: bool, force: bool) -> str:
    """Everything about OUT that can be checked before the work, without touching it; returns the kind.

    Refused: an unknown ending; a folder that cannot be written; a file where a folder goes (and
    the reverse); OUT already there without ``resume`` or ``force``; an existing OUT that is not a
    defectscope batch output (``force`` never deletes anything else)."""
    kind = output_kind(out)
    if kind == "parquet":
        if out.exists() and not out.is_dir():
            raise OutputError(
                f"{out}: is a file; Parquet output is a folder of parts (choose a new name, or end it "
                "in .csv for one CSV file)"
            )
        check_output_dir(out, "output folder")
        present = out.is_dir() and any(True for _ in out.iterdir())
        if present:
            strangers = sorted(p.name for p in out.iterdir() if not _OURS.fullmatch(p.name))
            if strangers:
                raise OutputError(
                    f"{out}: is a folder that is not a defectscope batch output (it holds "
                    f"{', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}); refusing "
                    "to write into it"
                )
    else:
        check_output_file(out, "CSV output")
        present = out.is_file() and out.stat().st_size > 0
        if present:
            with open(out, "rb") as fh:
                first = fh.readline().rstrip(b"\r\n").decode("utf-8", "replace")
            if first != _HEADER:
                raise OutputError(
                    f"{out}: exists and is not a defectscope batch CSV (its first line is not the "
                    f"header {_HEADER}); refusing to touch it"
                )
    if present and not (resume or force):
        raise OutputError(f"{out}: exists; --resume scores only the paths not in it yet, --force replaces it")
    return kind


class Sink:
    """The common part: path keys, duplicate dropping, counts. Subclasses store the rows."""

    def __init__(self, out: Path, checksum: str | None, threshold: float | None = None) -> None:
        self.out = out
        self.checksum = checksum
        self.threshold = threshold
        self.paths: set[str] = set()  # every path in OUT (as :meth:`key` gives it): earlier runs' and this run's
        self.checksums: set[str] = set()  # model checksums of the rows already there
        self.thresholds: set[float] = set()  # thresholds of the rows already there
        self.previous_rows = 0
        self.previous_errors = 0
        self.rows = 0  # written in this run
        self.errors = 0
        self.duplicates = 0

    def _check_model(self) -> None:
        """Rows of another model in OUT: refused (a resumed run never mixes two models' scores)."""
        others = sorted(c for c in self.checksums if c != self.checksum)
        if others:
            raise OutputError(
                f"{self.out}: holds rows of another model (checksum {others[0][:12]}..., this model's "
                f"is {(self.checksum or 'none')[:12]}...); --resume continues a run of the same model "
                "(--force replaces OUT)"
            )
        if self.threshold is not None and any(
            abs(t - self.threshold) > 1e-12 * max(1.0, abs(t)) for t in self.thresholds
        ):
            shown = ", ".join(f"{t:.6g}" for t in sorted(self.thresholds))
            raise OutputError(
                f"{self.out}: holds rows judged at threshold {shown}, this run judges at "
                f"{self.threshold:.6g}; resume with the same --threshold (--force replaces OUT)"
            )

    def key(self, path: str) -> str:
        """The path as OUT stores it (the resume key)."""
        return path

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Store ``rows`` (a row whose path is already in OUT is dropped and counted in ``duplicates``)."""
        fresh = []
        for row in rows:
            row = {**row, "path": self.key(row["path"])}
            if row["path"] in self.paths:
                self.duplicates += 1
                continue
            self.paths.add(row["path"])
            self.rows += 1
            self.errors += row["error"] is not None
            fresh.append(row)
        if fresh:
            self._append(fresh)

    def close(self, status: str, run: dict[str, Any]) -> None:
        """Commit what is buffered; ``status`` is "complete" or "interrupted"; ``run`` describes the run."""
        raise NotImplementedError

    def _append(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError


class ParquetSink(Sink):
    """A folder of Parquet parts and ``_manifest.json``; see the module docstring."""

    def __init__(
        self,
        out: Path,
        *,
        model: dict[str, Any],
        resume: bool,
        force: bool,
        part_rows: int = 10_000,
        flush_seconds: float = 30.0,
    ) -> None:
        super().__init__(out, model.get("checksum"), model.get("threshold"))
        import pyarrow.parquet  # noqa: F401 - fail here, before the work, when pyarrow is missing

        self.model = model
        self.part_rows = part_rows
        self.flush_seconds = flush_seconds
        self.buffer: list[dict[str, Any]] = []
        self.first_buffered = 0.0
        self.runs: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # a part or manifest being written when a run was killed
            stale.unlink()
        if force:
            for old in [*self._parts(), out / MANIFEST]:
                old.unlink(missing_ok=True)
        if resume:
            self._read_existing()
            self._check_model()
        self.next_part = max((int(_PART.fullmatch(p.name).group(1)) + 1 for p in self._parts()), default=0)
        self._write_manifest("running")

    def key(self, path: str) -> str:
        """Parquet strings are UTF-8: a file name's undecodable bytes (kept by ``os.fsdecode`` as lone
        surrogates) are stored as ``\\xNN`` escapes, losslessly readable, and that is the resume key."""
        return text_path(path)

    def _parts(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if _PART.fullmatch(p.name))

    def _read_existing(self) -> None:
        import pyarrow.parquet as pq

        manifest = self.out / MANIFEST
        status = None
        if manifest.is_file():
            try:
                recorded = json.loads(manifest.read_text())
                self.runs, status = list(recorded.get("runs", [])), recorded.get("status")
            except ValueError:
                self.runs = []  # only descriptive: the parts are the truth
        for part in self._parts():
            try:
                table = pq.read_table(part, columns=["path", "error", "model_checksum", "threshold"])
            except Exception as exc:
                raise OutputError(f"{part}: cannot be read as a batch part ({exc}); move it away to resume") from exc
            paths = table.column("path").to_pylist()
            self.paths.update(paths)
            self.checksums.update(c for c in table.column("model_checksum").unique().to_pylist() if c)
            self.thresholds.update(t for t in table.column("threshold").unique().to_pylist() if t is not None)
            self.previous_rows += len(paths)
            self.previous_errors += len(paths) - table.column("error").null_count
        if status == "running":  # a run that never closed its manifest (killed): listed with the rows it left
            left = self.previous_rows - sum(int(r.get("rows", 0)) for r in self.runs)
            self.runs.append(
                {
                    "status": "killed",
                    "rows": max(left, 0),
                    "note": "the run ended without closing its manifest; found by --resume",
                }
            )

    def _append(self, rows: list[dict[str, Any]]) -> None:
        if not self.buffer:
            self.first_buffered = time.monotonic()
        self.buffer.extend(rows)
        if len(self.buffer) >= self.part_rows or time.monotonic() - self.first_buffered >= self.flush_seconds:
            self.commit()

    def commit(self) -> None:
        """Write the buffered rows as the next part (atomically)."""
        if not self.buffer:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .rows import arrow_schema

        table = pa.Table.from_pylist(self.buffer, schema=arrow_schema())
        final = self.out / f"part-{self.next_part:06d}.parquet"
        tmp = self.out / f".{final.name}.{os.getpid()}.tmp"
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, new_file_mode())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.out)
        self.next_part += 1
        self.buffer = []

    def close(self, status: str, run: dict[str, Any]) -> None:
        self.commit()
        self.runs.append(run)
        self._write_manifest(status)

    def _write_manifest(self, status: str) -> None:
        import pyarrow.parquet as pq

        parts = [{"file": p.name, "rows": pq.ParquetFile(p).metadata.num_rows} for p in self._parts()]
        manifest = {
            "format": FORMAT,
            "status": status,
            "model": self.model,
            "rows": sum(p["rows"] for p in parts),
            "errors": self.previous_errors + self.errors,
            "columns": list(COLUMNS),
            "parts": parts,
            "runs": self.runs,
        }
        with replacing(self.out / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")


class CsvSink(Sink):
    """One CSV file, a header and a line per row, flushed per write; see the module docstring."""

    def __init__(
        self, out: Path, *, checksum: str | None, resume: bool, force: bool, threshold: float | None = None
    ) -> None:
        super().__init__(out, checksum, threshold)
        out.parent.mkdir(parents=True, exist_ok=True)
        existing = out.is_file() and out.stat().st_size > 0
        if existing and resume and not force:
            self._read_existing()
            self._check_model()
            # the sink holds its file open across writes and closes it in close()
            self.fh = open(out, "a", encoding="utf-8", errors="surrogateescape", newline="")  # noqa: SIM115
        else:
            self.fh = open(out, "w", encoding="utf-8", errors="surrogateescape", newline="")  # noqa: SIM115
            self.fh.write(_HEADER + "\n")
            self.fh.flush()
        self.writer = csv.writer(self.fh, lineterminator="\n")

    def _read_existing(self) -> None:
        """Read the paths, error count and checksums; cut off an incomplete last line (a killed run's)."""
        good = 0
        pending = b""
        index = {name: i for i, name in enumerate(COLUMNS)}
        with open(self.out, "rb") as fh:
            header = fh.readline()
            good = len(header)
            for line in fh:
                pending += line
                if not line.endswith(b"\n") or pending.count(b'"') % 2:  # unfinished, or a newline inside quotes
                    continue
                text = pending.decode("utf-8", "surrogateescape")
                record = next(csv.reader(io.StringIO(text, newline="")), None)
                if record is not None and len(record) == len(COLUMNS):
                    self.paths.add(record[index["path"]])
                    self.previous_rows += 1
                    self.previous_errors += record[index["error"]] != ""
                    if record[index["model_checksum"]]:
                        self.checksums.add(record[index["model_checksum"]])
                    if record[index["threshold"]]:
                        self.thresholds.add(float(record[index["threshold"]]))
                good += len(pending)
                pending = b""
        if pending:
            with open(self.out, "r+b") as fh:
                fh.truncate(good)

    def _append(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
        self.fh.flush()

    def close(self, status: str, run: dict[str, Any]) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def open_sink(
    out: Path,
    kind: str,
    *,
    model: dict[str, Any],
    resume: bool,
    force: bool,
    part_rows: int = 10_000,
    flush_seconds: float = 30.0,
) -> Sink:
    if kind == "parquet":
        return ParquetSink(
            out, model=model, resume=resume, force=force, part_rows=part_rows, flush_seconds=flush_seconds
        )
    return CsvSink(out, checksum=model.get("checksum"), resume=resume, force=force, threshold=model.get("threshold"))


def text_path(path: str) -> str:
    """``path`` with undecodable file-name bytes (lone surrogates) written as ``\\xNN`` escapes (valid UTF-8)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold OUT for this run: a second run on the same OUT at the same time is refused (its parts would
    overwrite this run's). An advisory lock on a hidden file beside OUT, released when the process ends,
    however it ends (kill -9 included)."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"{out}: another defectscope batch is writing it now; wait for that run to end, or give another OUT"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_output(out: Path) -> list[dict[str, Any]]:
    """Every row of a batch output (Parquet folder or CSV) as dicts, typed as written: for tests and
    small outputs (a large one is better read with pyarrow.dataset or pandas directly)."""
    if output_kind(out) == "parquet":
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for part in sorted(p for p in out.iterdir() if _PART.fullmatch(p.name)):
            rows.extend(pq.read_table(part).to_pylist())
        return rows
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        records = list(csv.DictReader(fh))
    typed = {"score": float, "judgement": int, "threshold": float, "normalized_score": float}
    return [
        {k: (None if v == "" and k != "path" else typed[k](v) if k in typed else v) for k, v in r.items()}
        for r in records
    ]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
