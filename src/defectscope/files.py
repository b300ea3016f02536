"""Writing output files safely: never a half file in place of a good one, and normal permissions.

:func:`replacing` hands out a temporary path in the target's folder; once the caller has written
it completely, the file is flushed to disk, given its final permissions and renamed over the
target in one step (readers see the old file or the new one); if anything fails it is removed.
``tempfile.mkstemp`` creates files readable by their owner only (0600), and some writers (the
safetensors library) recreate the file, so the mode is set at the end: the mode of the file being
replaced, or the mode any new file of the user's gets (0666 minus the umask).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["new_file_mode", "replacing"]


def new_file_mode() -> int:
    """The permission bits a newly created file gets here: 0o666 without the process umask."""
    try:
        with open("/proc/self/status") as fh:  # Linux: read the umask without changing it
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere: set and restore (process-wide, but only for an instant)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it atomically becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else new_file_mode()
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
