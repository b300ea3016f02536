"""INPUT arguments -> image paths, in order, each once.

An argument is an image file, a folder (searched recursively, as ``predict``), a glob, or a list
file: a file ending in ``.txt``, ``.lst`` or ``.list`` holding one path per line (blank lines
skipped, ``\\r\\n`` accepted; each line taken literally, relative to the current folder, with no
folder search or globbing: a listed path that is missing becomes an error row). Paths are keyed
by their text as ``str(Path(...))`` gives it (``./a.png`` and ``a.png`` are one key): that is
the ``path`` column and what ``--resume`` matches on. Keys are text, not files: the same image
given once relative and once absolute is two rows, so give an archive the same way every time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LIST_SUFFIXES: tuple[str, ...] = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Entry:
    """One image path to score, or an argument that gave none (``error`` set: it becomes an error row)."""

    path: str
    error: str | None = None


def is_list_file(arg: str) -> bool:
    return Path(arg).suffix.lower() in LIST_SUFFIXES and Path(arg).is_file()


def read_list(path: str | Path) -> Iterator[str]:
    """The paths of a list file, one per line, as keys."""
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\n")
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.strip():
                yield str(Path(os.fsdecode(line)))


def expand_inputs(args: Sequence[str], exclude: Path | None = None) -> Iterator[Entry]:
    """Each image path of ``args`` once (the first time it appears), in argument order.

    ``exclude``: a folder whose images a folder search or glob skips (the ``--heatmaps`` folder of an
    earlier run); files named explicitly or listed are never skipped."""
    from ..data.layouts import expand_in_order

    seen: set[str] = set()
    excluded = exclude.resolve() if exclude is not None else None
    for arg in args:
        if is_list_file(arg):
            found = ((key, None) for key in read_list(arg))
        else:
            explicit = Path(os.path.expanduser(arg)).is_file()
            found = ((str(e), None) if isinstance(e, Path) else (e[0], e[1]) for e in expand_in_order([arg]))
            if excluded is not None and not explicit:
                found = ((k, m) for k, m in found if m is not None or excluded not in Path(k).resolve().parents)
        for key, message in found:
            if key not in seen:
                seen.add(key)
                yield Entry(key, message)
