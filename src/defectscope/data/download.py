"""Download MVTec AD and VisA from their official URLs: verified, resumable, safely extracted.

``defectscope download mvtec_ad|visa [--category ...] -o DIR`` lands the data where the loaders
look for it:

* MVTec AD: ``DIR/<category>/{train/good, test/<type>, ground_truth/<type>}``;
* VisA: ``DIR/visa/`` with ``split_csv/1cls.csv`` and one folder per object.

Downloads stream to ``<file>.part`` and resume with an HTTP ``Range`` request; a finished file
is checked against the published size and checksum before it is renamed into place. Archives
are extracted into a staging folder (rejecting absolute paths, ``..`` and links that leave the
target) and moved into place only once complete, so a folder that exists is a finished one.

Checksums: the sha256 of the whole MVTec AD archive and of the VisA archive are the ones the
anomalib project publishes for these URLs. No checksum or size is published for the MVTec AD
per-category archives: those are checked against the server's Content-Length only (logged).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import DefectscopeError
from ..version import __version__

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes read per network / hashing step
_DOWNLOADS = ".downloads"  # archive cache folder inside the output folder


@dataclass(frozen=True)
class Archive:
    """One downloadable file: where it lives and what it must look like once fetched."""

    url: str
    size: int | None = None  # bytes; None = not published
    sha256: str | None = None  # hex; None = not published
    md5: str | None = None  # hex; used only when no sha256 is known

    @property
    def file_name(self) -> str:
        """The last segment of the URL (``bottle.tar.xz``)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]


_MYDRIVE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"

MVTEC_AD_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

VISA_OBJECTS: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip

ALL = "all"  # registry key of a dataset's whole-dataset archive

# Official download locations (linked from mvtec.com and from amazon-science/spot-diff).
# Key "all" = the whole-dataset archive; other keys = one category's archive.
ARCHIVES: dict[str, dict[str, Archive]] = {
    "mvtec_ad": {
        ALL: Archive(
            f"{_MYDRIVE}/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
            sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        ),
        "bottle": Archive(f"{_MYDRIVE}/420937370-1629951468/bottle.tar.xz"),
        "cable": Archive(f"{_MYDRIVE}/420937413-1629951498/cable.tar.xz"),
        "capsule": Archive(f"{_MYDRIVE}/420937454-1629951595/capsule.tar.xz"),
        "carpet": Archive(f"{_MYDRIVE}/420937484-1629951672/carpet.tar.xz"),
        "grid": Archive(f"{_MYDRIVE}/420937487-1629951814/grid.tar.xz"),
        "hazelnut": Archive(f"{_MYDRIVE}/420937545-1629951845/hazelnut.tar.xz"),
        "leather": Archive(f"{_MYDRIVE}/420937607-1629951964/leather.tar.xz"),
        "metal_nut": Archive(f"{_MYDRIVE}/420937637-1629952063/metal_nut.tar.xz"),
        "pill": Archive(
            "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download/"
            "420938129-1629953099/pill.tar.xz"
        ),
        "screw": Archive(f"{_MYDRIVE}/420938130-1629953152/screw.tar.xz"),
        "tile": Archive(f"{_MYDRIVE}/420938133-1629953189/tile.tar.xz"),
        "toothbrush": Archive(f"{_MYDRIVE}/420938134-1629953256/toothbrush.tar.xz"),
        "transistor": Archive(f"{_MYDRIVE}/420938166-1629953277/transistor.tar.xz"),
        "wood": Archive(f"{_MYDRIVE}/420938383-1629953354/wood.tar.xz"),
        "zipper": Archive(f"{_MYDRIVE}/420938385-1629953449/zipper.tar.xz"),
    },
    "visa": {
        ALL: Archive(
            "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
            sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
            md5="ef908989b6dc701fc218f643c127a4de",
        ),
        # Fetched only when the archive lacks split_csv/1cls.csv (it normally ships it).
        "split_csv": Archive("https://raw.githubusercontent.com/amazon-science/spot-diff/main/split_csv/1cls.csv"),
    },
}

CATEGORIES: dict[str, tuple[str, ...]] = {"mvtec_ad": MVTEC_AD_CATEGORIES, "visa": VISA_OBJECTS}
_ALIASES = {"mvtec": "mvtec_ad", "mvtecad": "mvtec_ad", "mvtec-ad": "mvtec_ad"}


# --------------------------------------------------------------------------- public API


def download_dataset(
    dataset: str,
    out_dir: Path,
    categories: Sequence[str] | None = None,
    progress: bool = False,
    base_url: str | None = None,
    keep_archives: bool = False,
) -> list[Path]:
    """Download, verify and extract ``dataset`` ("mvtec_ad" or "visa") under ``out_dir``.

    categories: MVTec AD categories / VisA objects (None = all). MVTec AD uses the
        per-category archives when categories are named and the whole-dataset archive
        otherwise; VisA has a single archive, always fetched whole.
    base_url: replaces everything before each archive's file name (e.g. a mirror, or a
        loopback server in tests).
    Returns the category folders (``out_dir/<category>`` or ``out_dir/visa/<object>``).
    Folders that already exist and look complete are not downloaded again.
    """
    name = _ALIASES.get(dataset.lower(), dataset.lower())
    if name not in ARCHIVES:
        raise DefectscopeError(f"unknown dataset {dataset!r}; choose one of: {', '.join(sorted(ARCHIVES))}")
    valid = CATEGORIES[name]
    if categories is not None:
        categories = list(dict.fromkeys(categories))
        unknown = [c for c in categories if c not in valid]
        if unknown or not categories:
            raise DefectscopeError(
                f"unknown {name} categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown) or '(none given)'}; "
                f"valid: {', '.join(valid)}"
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == "mvtec_ad":
        return _download_mvtec(out_dir, categories, progress, base_url, keep_archives)
    return _download_visa(out_dir, categories or list(valid), progress, base_url, keep_archives)


def fetch(
    url: str,
    dest: Path,
    size: int | None,
    sha256: str | None,
    progress: bool = False,
    timeout: float = 60,
    md5: str | None = None,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part``.

    A ``Range`` request continues an existing ``.part``: a 206 answer is appended, a 200
    answer restarts from zero. The finished file must match ``size`` (else the server's
    length) and ``sha256`` (else ``md5``; neither known = logged, size-only check); on a
    mismatch the ``.part`` is deleted. On success ``.part`` is renamed to ``dest`` atomically.
    Raises :class:`DefectscopeError` naming the URL; an interrupted download keeps its
    ``.part`` so that calling again resumes it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        if _matches(dest, size, sha256, md5):
            log.info("%s already downloaded", dest)
            return dest
        log.warning("%s does not match the expected size/checksum; downloading it again", dest)
        dest.unlink()

    total = _stream(url, part, size, progress, timeout)
    expected = size if size is not None else total
    actual = part.stat().st_size
    if expected is not None and actual < expected:
        raise DefectscopeError(
            f"download of {url} stopped at {actual} of {expected} bytes; run again to resume from {part}"
        )
    if expected is not None and actual > expected:
        part.unlink()
        raise DefectscopeError(f"download of {url} is {actual} bytes, expected {expected}; deleted it, run again")
    _verify_checksum(url, part, sha256, md5)
    os.replace(part, dest)
    log.info("downloaded %s (%d bytes)", dest, actual)
    return dest


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar (plain/gz/bz2/xz) or zip ``archive`` into ``dest``, refusing unsafe members.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    links pointing outside ``dest`` and device/fifo entries raise :class:`DefectscopeError`.
    Tar extraction also uses tarfile's ``"data"`` filter where the Python version has it.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DefectscopeError(f"{archive}: archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    if tarfile.is_tarfile(archive):
        _extract_tar(archive, root)
    elif zipfile.is_zipfile(archive):
        _extract_zip(archive, root)
    else:
        raise DefectscopeError(f"{archive}: not a tar or zip archive; delete it and download again")


# --------------------------------------------------------------------------- datasets


def _url(archive: Archive, base_url: str | None) -> str:
    return archive.url if base_url is None else f"{base_url.rstrip('/')}/{archive.file_name}"


def _get(archive: Archive, cache: Path, base_url: str | None, progress: bool) -> Path:
    return fetch(
        _url(archive, base_url),
        cache / archive.file_name,
        archive.size,
        archive.sha256,
        progress=progress,
        md5=archive.md5,
    )


def _mvtec_complete(folder: Path) -> bool:
    """A category folder with train/good images, test/ and ground_truth/."""
    good = folder / "train" / "good"
    return (
        good.is_dir()
        and any(p.is_file() for p in good.iterdir())
        and (folder / "test").is_dir()
        and (folder / "ground_truth").is_dir()
    )


def _download_mvtec(
    out_dir: Path, categories: list[str] | None, progress: bool, base_url: str | None, keep: bool
) -> list[Path]:
    wanted = categories or list(MVTEC_AD_CATEGORIES)
    todo = [c for c in wanted if not _mvtec_complete(out_dir / c)]
    for c in todo:
        if (out_dir / c).exists():
            raise DefectscopeError(
                f"{out_dir / c} exists but is not a complete MVTec AD category; remove it and run again"
            )
    if not todo:
        log.info("MVTec AD categories already present in %s", out_dir)
        return [out_dir / c for c in wanted]
    cache = out_dir / _DOWNLOADS
    groups = [(ALL, todo)] if categories is None else [(c, [c]) for c in todo]
    for key, cats in groups:
        archive = _get(ARCHIVES["mvtec_ad"][key], cache, base_url, progress)
        staging = _fresh(out_dir / f".{key}.extracting")
        try:
            safe_extract(archive, staging)
            for c in cats:
                found = _data_root(staging, c, archive) / c
                if not _mvtec_complete(found):
                    raise DefectscopeError(f"{archive}: category {c} lacks train/good, test or ground_truth")
                os.replace(found, out_dir / c)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not keep:
            archive.unlink()
    _tidy(cache)
    return [out_dir / c for c in wanted]


def _download_visa(out_dir: Path, objects: list[str], progress: bool, base_url: str | None, keep: bool) -> list[Path]:
    root = out_dir / "visa"
    if (root / "split_csv" / "1cls.csv").is_file() and all((root / o).is_dir() for o in objects):
        log.info("VisA already present in %s", root)
        return [root / o for o in objects]
    if root.exists():
        raise DefectscopeError(f"{root} exists but is not a complete VisA folder; remove it and run again")
    cache = out_dir / _DOWNLOADS
    archive = _get(ARCHIVES["visa"][ALL], cache, base_url, progress)
    staging = _fresh(out_dir / ".visa.extracting")
    try:
        safe_extract(archive, staging)
        data = _data_root(staging, objects[0], archive)
        absent = [o for o in objects if not (data / o).is_dir()]
        if absent:
            raise DefectscopeError(f"{archive}: no folder for VisA object(s) {', '.join(absent)}")
        split_csv = data / "split_csv" / "1cls.csv"
        if not split_csv.is_file():
            log.info("%s has no split_csv/1cls.csv; fetching the official split file", archive)
            spec = ARCHIVES["visa"]["split_csv"]
            fetch(_url(spec, base_url), split_csv, spec.size, spec.sha256, md5=spec.md5)
        os.replace(data, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep:
        archive.unlink()
    _tidy(cache)
    return [root / o for o in objects]


def _fresh(folder: Path) -> Path:
    """An empty staging folder (a leftover from an interrupted run is removed)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _data_root(staging: Path, child: str, archive: Path) -> Path:
    """The folder holding ``child``: ``staging`` itself or the archive's single top folder."""
    if (staging / child).is_dir():
        return staging
    tops = [p for p in staging.iterdir() if p.is_dir()]
    if len(tops) == 1 and (tops[0] / child).is_dir():
        return tops[0]
    raise DefectscopeError(f"{archive}: no {child}/ folder inside; delete the archive and download again")


def _tidy(cache: Path) -> None:
    if cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()


# --------------------------------------------------------------------------- HTTP


def _stream(url: str, part: Path, size: int | None, progress: bool, timeout: float) -> int | None:
    """Append ``url`` to ``part`` (resuming); return the full length the server reported."""
    for attempt in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        if size is not None and offset > size:
            log.warning("%s is larger than the expected %d bytes; starting over", part, size)
            part.unlink()
            offset = 0
        if size is not None and offset == size:
            return size
        headers = {"User-Agent": f"defectscope/{__version__}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset and attempt == 0:
                total = _content_range_total(err.headers.get("Content-Range"))
                err.close()
                if total == offset:
                    return total
                log.warning("server refused to resume %s; starting over", url)
                part.unlink()
                continue
            raise DefectscopeError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
        except (OSError, ValueError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise DefectscopeError(f"download of {url} failed: {reason}; check the network and run again") from err
        with resp:
            return _receive(url, resp, part, offset, size, progress)
    raise DefectscopeError(f"download of {url} failed: the server would not resume or restart it")


def _receive(
    url: str, resp: http.client.HTTPResponse, part: Path, offset: int, size: int | None, progress: bool
) -> int | None:
    """Write the response body to ``part`` (append on 206); return the server's full length."""
    length = resp.headers.get("Content-Length")
    body = int(length) if length and length.isdigit() else None
    if offset and resp.status == 206:
        start = _content_range_start(resp.headers.get("Content-Range"))
        if start != offset:
            raise DefectscopeError(
                f"download of {url}: server resumed at byte {start}, asked for {offset}; delete {part} and run again"
            )
        total = _content_range_total(resp.headers.get("Content-Range"))
        mode = "ab"
        log.info("resuming %s at byte %d", url, offset)
    else:
        if offset:
            log.info("server ignored the resume request for %s; starting over", url)
        offset, mode = 0, "wb"
        total = body
    if total is None and body is not None:
        total = offset + body
    if size is not None and total is not None and total != size:
        part.unlink(missing_ok=True)
        raise DefectscopeError(
            f"{url} is {total} bytes on the server, expected {size}; the file may have changed upstream"
        )

    from tqdm.auto import tqdm  # only needed while downloading

    done = offset
    with (
        part.open(mode) as fh,
        tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5], disable=not progress) as bar,
    ):
        try:
            while chunk := resp.read(_CHUNK):
                fh.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DefectscopeError(
                f"download of {url} interrupted at byte {done} ({type(err).__name__}); run again to resume"
            ) from err
    return total


_RANGE = re.compile(r"bytes\s+(\d+|\*)(?:-(\d+))?/(\d+|\*)")


def _content_range_start(header: str | None) -> int | None:
    m = _RANGE.match(header or "")
    return int(m.group(1)) if m and m.group(1) != "*" else None


def _content_range_total(header: str | None) -> int | None:
    m = _RANGE.match(header or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_checksum(url: str, path: Path, sha256: str | None, md5: str | None) -> None:
    algorithm, expected = ("sha256", sha256) if sha256 else ("md5", md5) if md5 else (None, None)
    if algorithm is None or expected is None:
        log.warning("no published checksum for %s; checked its size only", url)
        return
    actual = _digest(path, algorithm)
    if actual != expected.lower():
        path.unlink()
        raise DefectscopeError(
            f"{algorithm} of {url} is {actual}, expected {expected}; deleted the download, run again"
        )


def _matches(path: Path, size: int | None, sha256: str | None, md5: str | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    if sha256:
        return _digest(path, "sha256") == sha256.lower()
    if md5:
        return _digest(path, "md5") == md5.lower()
    return True


# --------------------------------------------------------------------------- extraction


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _check_name(archive: Path, name: str) -> str:
    """The normalised target of member ``name``; raise if absolute or escaping."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute():
        raise DefectscopeError(f"{archive}: refusing member {name!r} with an absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise DefectscopeError(f"{archive}: refusing member {name!r} that climbs out with '..'")
    return name


def _extract_tar(archive: Path, root: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_tar_member(archive, root, m)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(root, members=members)
    except tarfile.TarError as err:
        if isinstance(err, getattr(tarfile, "FilterError", ())):
            raise DefectscopeError(f"{archive}: refusing unsafe member ({err})") from err
        raise DefectscopeError(f"{archive}: cannot extract ({err}); delete it and download again") from err
    except (EOFError, OSError) as err:
        raise DefectscopeError(f"{archive}: cannot extract ({err}); delete it and download again") from err


def _check_tar_member(archive: Path, root: str, m: tarfile.TarInfo) -> None:
    _check_name(archive, m.name)
    target = os.path.normpath(os.path.join(root, m.name))
    if not _inside(root, target):
        raise DefectscopeError(f"{archive}: refusing member {m.name!r} outside the target folder")
    if m.ischr() or m.isblk() or m.isfifo():
        raise DefectscopeError(f"{archive}: refusing special file member {m.name!r}")
    if m.issym() or m.islnk():
        link = m.linkname
        if posixpath.isabs(link) or PureWindowsPath(link).drive:
            raise DefectscopeError(f"{archive}: refusing link {m.name!r} -> {link!r} (absolute target)")
        base = os.path.dirname(target) if m.issym() else root
        if not _inside(root, os.path.normpath(os.path.join(base, link))):
            raise DefectscopeError(f"{archive}: refusing link {m.name!r} -> {link!r} pointing outside the target")


def _extract_zip(archive: Path, root: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_name(archive, info.filename)
                if not _inside(root, os.path.normpath(os.path.join(root, info.filename))):
                    raise DefectscopeError(f"{archive}: refusing member {info.filename!r} outside the target folder")
            zf.extractall(root)
    except (zipfile.BadZipFile, OSError) as err:
        raise DefectscopeError(f"{archive}: cannot extract ({err}); delete it and download again") from err
