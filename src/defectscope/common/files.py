"""Writing output files safely: never a half file in place of a good one, and normal permissions.

:func:`replacing` hands out a temporary path in the target's folder; once the caller has written
it completely, the file is flushed to disk, given its final permissions and renamed over the
target in one step (readers see the old file or the new one); if anything fails it is removed.
``tempfile.mkstemp`` creates files readable by their owner only (0600), and some writers (the
safetensors library) recreate the file, so the mode is set at the end: the mode of the file being
replaced, or the mode any new file of the user's gets (0666 minus the umask).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import DefectscopeError

__all__ = [
    "JSON_FILE",
    "FileKind",
    "OutputError",
    "check_output_dir",
    "check_output_file",
    "new_file_mode",
    "os_error_message",
    "replacing",
]


class OutputError(DefectscopeError):
    """An output location that cannot be written (checked before the work, or failing while writing)."""


def os_error_message(exc: OSError, path: str | Path | None = None) -> str:
    """``PATH: what is wrong`` for an OS error, e.g. ``m.dsmodel: no space left on device``."""
    name = exc.filename if exc.filename is not None else path
    what = (exc.strerror or str(exc)).lower()
    return f"{name}: {what}" if name is not None else what


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_folder_writable(folder: Path, target: Path, what: str) -> None:
    """``folder`` (or, if it does not exist yet, the folder it would be created in) accepts new files."""
    existing = _nearest_existing(folder.resolve() if not folder.exists() else folder)
    if not existing.is_dir():
        raise OutputError(f"{target}: cannot write the {what}: {existing} is a file, not a folder")
    try:  # a real probe: permissions, read-only file systems and ACLs all show up here
        fd, probe = tempfile.mkstemp(prefix=".defectscope-probe.", dir=existing)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write the {what}: {os_error_message(exc, existing)}") from exc
    os.close(fd)
    os.unlink(probe)


def check_output_file(
    path: str | Path,
    what: str = "output file",
    *,
    replaces: FileKind | None = None,
    inputs: tuple[str | Path, ...] = (),
) -> Path:
    """Fail now, with a message naming ``path``, if a file cannot (or must not) be written there later.

    Checks that ``path`` is not a folder, that its folder exists or can be created and accepts new
    files, that it is none of ``inputs`` (a result never overwrites what it is computed from), and,
    when a file is already there, that it is of the kind about to be written (``replaces``, e.g.
    :data:`JSON_FILE` or :data:`defectscope.io.MODEL_FILE`); anything else already there (an image,
    say) is refused. Raises :class:`OutputError`. Use before the long work.
    """
    path = Path(path)
    if path.is_dir():
        example = replaces.example if replaces is not None else "output"
        raise OutputError(f"{path}: is a folder; give a file name for the {what} (e.g. {path / example})")
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise OutputError(f"{path}: is also an input of this command; write the {what} somewhere else")
    if path.is_file() and replaces is not None and not replaces.recognise(path):
        raise OutputError(
            f"{path}: exists and is not a {replaces.name} "
            f"file; refusing to overwrite it with the {what} (remove it or choose another name)"
        )
    _check_folder_writable(path.parent, path, what)
    return path


def _is_json(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError):
        return path.stat().st_size == 0
    return True


@dataclass(frozen=True)
class FileKind:
    """A kind of output file that may be overwritten by a file of the same kind.

    ``name`` is said in errors ("defectscope model"), ``example`` is a file name to suggest,
    ``recognise(path)`` tells whether an existing file is of this kind (it must not raise).
    """

    name: str
    example: str
    recognise: Callable[[Path], bool]


#: a JSON document (an empty file counts: a previous run may have been stopped before writing it)
JSON_FILE = FileKind("JSON", "results.json", _is_json)


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Fail now if ``path`` cannot be used as an output folder (a file is there, or it is not writable)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: is a file; the {what} must be a folder")
    _check_folder_writable(path, path, what)
    return path


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
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a file; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else new_file_mode()
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is not None and str(exc.filename) == str(tmp):  # the target's name, not the temporary's
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
