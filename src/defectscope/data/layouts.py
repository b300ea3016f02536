"""Find images on disk: command-line path arguments and dataset folder layouts.

Two dataset layouts are understood:

* **MVTec AD category** (:func:`mvtec_category`)::

      <category>/train/good/*            good training images
      <category>/test/<type>/*           test images; <type> "good" = label 0, anything else = defect
      <category>/ground_truth/<type>/<stem>_mask.<ext>   optional masks (non-zero = defect)

* **plain folder** (:func:`plain_folder`), for TEST data::

      <folder>/good/*                    good test images (label 0)
      <folder>/<type>/*                  every other sub-folder is a defect type (label 1)
      <folder>/masks/<type>/<stem>*      optional masks
      <folder>/train/**                  optional good training images (else train = [])

A simple VisA object folder (``train/Normal``, ``test/Anomaly``; see :mod:`.visa`) is also
accepted by :func:`good_images` and :func:`load_category`.

Images may be any of :data:`~defectscope.data.images.IMAGE_EXTENSIONS` (any case). Hidden
files and folders (name starting with ".") are skipped everywhere.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataLayoutError
from .images import IMAGE_EXTENSIONS
from .samples import Sample, Split
from .visa import is_visa_simple, visa_simple

log = logging.getLogger(__name__)

_GLOB_CHARS = ("*", "?", "[")
_PLAIN_RESERVED = ("good", "masks", "train")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files in ``folder`` (and its sub-folders if ``recursive``), sorted by path.

    Hidden files and anything inside hidden folders are skipped. A missing folder gives [].
    Folder links are followed, but every real folder is searched once: a link back into a
    folder already searched (a loop such as ``L/self -> ../L``) or to one reached another way is
    skipped, and the skipped links are logged (warning). Files that are not images (by their
    ending, see :data:`IMAGE_EXTENSIONS`) are logged too, a line per folder searched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if not recursive:
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        _note_not_images(folder, [p for p in files if not _is_image(p)])
        return sorted(p for p in files if _is_image(p))
    found: list[Path] = []
    others: list[Path] = []
    seen: set[tuple[int, int]] = set()
    skipped: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        base = Path(dirpath)
        st = os.stat(base)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: its files are already listed
            skipped.append(base)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        keep = []
        for d in dirnames:
            if d.startswith("."):
                continue
            try:
                sub = os.stat(base / d)
            except OSError:  # a dangling link
                skipped.append(base / d)
                continue
            if (sub.st_dev, sub.st_ino) in seen:
                skipped.append(base / d)
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            if not (base / name).exists():  # a link to nowhere (os.walk lists those as files)
                skipped.append(base / name)
                continue
            (found if _is_image(base / name) else others).append(base / name)
    if skipped:
        log.warning(
            "%s: skipped %d folder link(s) leading to folders already searched or nowhere: %s",
            folder,
            len(skipped),
            ", ".join(str(p) for p in skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    _note_not_images(folder, others)
    return sorted(found)


def _note_not_images(folder: Path, others: list[Path]) -> None:
    """Say which files in a searched folder were not taken as images (once per search)."""
    others = sorted(p for p in others if p.is_file())
    if others:
        names = ", ".join(str(p) for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        log.warning("%s: %d file(s) are not images and were skipped: %s", folder, len(others), names)


def _subfolders(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def expand_paths(args: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Turn ``predict`` arguments (files, folders, globs) into image paths.

    A file is returned as given (whatever its extension: the loader reports undecodable
    files); a folder is searched recursively for images; a glob (``*.png``, ``**/*.jpg``,
    ``~`` expanded) gives its matching image files, sorted, and the images inside any
    folder it matches. Paths keep the order of ``args``. A file named as an argument is always
    listed, once per time it is named (a script feeding N file names gets N results); an image
    found through a folder or glob is listed once, and not again if already listed (compared by
    resolved path, so a link to a listed file is not scored twice). Returns ``(paths, errors)``, where ``errors`` lists
    ``(arg, message)`` for a missing path or a folder/glob without images.
    """
    entries = expand_in_order(args)
    return ([e for e in entries if isinstance(e, Path)], [e for e in entries if not isinstance(e, Path)])


def expand_in_order(args: Sequence[str]) -> list[Path | tuple[str, str]]:
    """:func:`expand_paths` as one list in argument order: each image path, or ``(arg, message)``
    where an argument gave no image, so that a front end can report it in its place."""
    out: list[Path | tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(path)

    for arg in args:
        path = Path(os.path.expanduser(arg))
        if path.is_file():  # named explicitly: always listed
            seen.add(path.resolve())
            out.append(path)
        elif path.is_dir():
            images = find_images(path)
            if not images:
                out.append((arg, f"folder contains no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            for image in images:
                add(image)
        elif any(c in arg for c in _GLOB_CHARS):
            images = []
            for match in sorted(glob.glob(os.path.expanduser(arg), recursive=True)):
                hit = Path(match)
                if hit.is_dir():
                    images.extend(find_images(hit))
                elif hit.is_file() and _is_image(hit):
                    images.append(hit)
            if not images:
                out.append((arg, "pattern matched no image files"))
            for image in images:
                add(image)
        else:
            out.append((arg, "no such file or folder"))
    return out


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()


def good_images(data_dir: Path, min_images: int = 1) -> list[Path]:
    """Good training images of a dataset folder.

    ``train/good`` of an MVTec AD category, ``train/Normal`` of a simple VisA object folder,
    ``train/`` of a plain test folder (``good/`` + defect folders), else every image under
    ``data_dir``. Raises DataLayoutError for a missing folder, a plain test folder without
    ``train/``, or fewer than ``min_images`` images.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataLayoutError(f"{data_dir}: folder not found")
    if not data_dir.is_dir():
        raise DataLayoutError(f"{data_dir}: is a file; expected a folder of good images")
    if _is_mvtec_category(data_dir):
        source = data_dir / "train" / "good"
    elif is_visa_simple(data_dir):
        source = _child_dir(_child_dir(data_dir, "train"), "normal")
    elif _is_plain_test_folder(data_dir):
        source = data_dir / "train"
        if not source.is_dir():
            raise DataLayoutError(
                f"{data_dir}: a plain test folder (good/ + defect folders) without train/; "
                "put good training images in train/ or point at a folder of good images only"
            )
    else:
        source = data_dir
        _refuse_dataset_root(data_dir)
    images = find_images(source)
    if source == data_dir:
        masks = [p for p in images if {"ground_truth", "masks"} & set(p.relative_to(data_dir).parts[:-1])]
        if masks:
            raise DataLayoutError(
                f"{data_dir}: {len(masks)} of its images lie under ground_truth/ or masks/ folders ({_some(masks, 3)}): "
                "those are defect masks, not good parts; point at a folder of good images only"
            )
    if len(images) < min_images:
        raise DataLayoutError(
            f"{source}: found {len(images)} good image(s), need at least {min_images} ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return images


def _refuse_dataset_root(folder: Path) -> None:
    """A folder holding dataset categories (MVTec AD, VisA) is not a folder of good images: say which to use."""
    if folder.name in ("ground_truth", "masks"):
        raise DataLayoutError(f"{folder}: a folder of defect masks, not of good parts; point at the good images")
    inside = [p for p in _subfolders(folder) if _is_mvtec_category(p) or is_visa_simple(p)]
    if inside:
        names = ", ".join(p.name for p in inside[:5]) + (" ..." if len(inside) > 5 else "")
        raise DataLayoutError(
            f"{folder}: holds dataset categories ({names}), whose test images include defects; give one category "
            f"(e.g. {inside[0]}) to learn from its good training images"
        )


def _child_dir(parent: Path, name: str) -> Path:
    """The sub-folder of ``parent`` called ``name``, matched case-insensitively (VisA spells it either way)."""
    hits = [p for p in _subfolders(parent) if p.name.lower() == name.lower()]
    return parent / name if (parent / name).is_dir() or not hits else hits[0]


def _is_plain_test_folder(folder: Path) -> bool:
    """True if ``folder`` has ``good/`` and at least one defect-type folder beside it."""
    if not (folder / "good").is_dir():
        return False
    return any(p.name not in _PLAIN_RESERVED for p in _subfolders(folder))


def _mask_index(mask_dir: Path) -> dict[str, Path]:
    """Map image stem -> mask file for masks named ``<stem>_mask.<ext>`` or ``<stem>.<ext>``."""
    index: dict[str, Path] = {}
    plain: dict[str, Path] = {}
    for mask in find_images(mask_dir, recursive=False):
        stem = mask.stem
        if stem.endswith("_mask"):
            index.setdefault(stem[: -len("_mask")], mask)
        else:
            plain.setdefault(stem, mask)
    for stem, mask in plain.items():
        index.setdefault(stem, mask)
    return index


def _defect_samples(folder: Path, defect_type: str, masks: dict[str, Path]) -> list[Sample]:
    """Defective samples of one type, each with its mask (None when it has none)."""
    return [
        Sample(path=image, label=1, defect_type=defect_type, mask_path=masks.get(image.stem))
        for image in find_images(folder, recursive=False)
    ]


def _warn_missing_masks(where: Path, samples: list[Sample], mask_dirs: Sequence[Path] = ()) -> None:
    """One warning naming the defective images without a mask, one naming mask files that match no image."""
    missing = [s.path for s in samples if s.label == 1 and s.mask_path is None]
    total = sum(s.label == 1 for s in samples)
    if missing:
        log.warning(
            "%s: %d of %d defective image(s) have no ground-truth mask (pixel metrics are skipped): %s",
            where,
            len(missing),
            total,
            _some(missing),
        )
    used = {s.mask_path.resolve() for s in samples if s.mask_path is not None}
    orphans = [m for d in mask_dirs for m in find_images(d, recursive=False) if m.resolve() not in used]
    if orphans:
        log.warning(
            "%s: %d mask file(s) match no test image (check their names): %s", where, len(orphans), _some(orphans)
        )


def _some(paths: Sequence[Path], n: int = 10) -> str:
    names = ", ".join(str(p) for p in paths[:n])
    return names + (f" and {len(paths) - n} more" if len(paths) > n else "")


def mvtec_category(category_dir: Path) -> Split:
    """Parse an MVTec AD category folder (layout in the module docstring).

    Defective images without a mask get ``mask_path=None`` (a warning gives the count).
    Raises DataLayoutError naming a missing folder, or when train/good or test/ has no images.
    """
    category_dir = Path(category_dir)
    if not category_dir.is_dir():
        raise DataLayoutError(f"{category_dir}: folder not found")
    missing = [name for name in ("train/good", "test") if not (category_dir / name).is_dir()]
    if missing:
        raise DataLayoutError(
            f"{category_dir}: not an MVTec AD category, missing {' and '.join(m + '/' for m in missing)}"
        )
    train = find_images(category_dir / "train" / "good")
    if not train:
        raise DataLayoutError(f"{category_dir / 'train' / 'good'}: no training images found")
    test: list[Sample] = []
    mask_dirs: list[Path] = []
    for type_dir in _subfolders(category_dir / "test"):
        if type_dir.name == "good":
            test.extend(Sample(path=p, label=0, defect_type="good") for p in find_images(type_dir, recursive=False))
            continue
        mask_dirs.append(category_dir / "ground_truth" / type_dir.name)
        masks = _mask_index(mask_dirs[-1])
        test.extend(_defect_samples(type_dir, type_dir.name, masks))
    if not test:
        raise DataLayoutError(f"{category_dir / 'test'}: no test images found in its sub-folders")
    _warn_missing_masks(category_dir, test, mask_dirs)
    return Split(name=category_dir.name, train=train, test=test)


def mvtec_root(root: Path) -> list[Path]:
    """Category folders (with train/good and test/) directly under an MVTec AD root, sorted.

    Raises DataLayoutError when ``root`` is missing or holds no category.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{root}: folder not found")
    categories = [p for p in _subfolders(root) if _is_mvtec_category(p)]
    if not categories:
        raise DataLayoutError(f"{root}: no MVTec AD categories (sub-folders with train/good/ and test/) found")
    return categories


def _plain_mask_index(mask_dir: Path) -> dict[str, Path]:
    """Map image stem -> mask for masks named ``<stem>.<ext>`` or ``<stem>_<anything>.<ext>``."""
    index: dict[str, Path] = {}
    masks = find_images(mask_dir, recursive=False)
    for mask in masks:  # exact stems win over "<stem>_..." names
        index.setdefault(mask.stem, mask)
    for mask in masks:
        if "_" in mask.stem:
            index.setdefault(mask.stem.rsplit("_", 1)[0], mask)
    return index


def plain_folder(folder: Path) -> Split:
    """Parse a plain folder of TEST data (layout in the module docstring).

    There is no separate train split in this layout: train comes from an optional
    ``folder/train/`` (searched recursively), else ``train == []`` and the caller must
    supply good images separately. Raises DataLayoutError if ``good/`` is missing or there
    are no test images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataLayoutError(f"{folder}: folder not found")
    if not (folder / "good").is_dir():
        raise DataLayoutError(f"{folder}: missing good/ (a plain test folder needs good/ plus defect-type folders)")
    test = [Sample(path=p, label=0, defect_type="good") for p in find_images(folder / "good", recursive=False)]
    mask_dirs: list[Path] = []
    for type_dir in _subfolders(folder):
        if type_dir.name in _PLAIN_RESERVED:
            continue
        mask_dirs.append(folder / "masks" / type_dir.name)
        masks = _plain_mask_index(mask_dirs[-1])
        test.extend(_defect_samples(type_dir, type_dir.name, masks))
    if not test:
        raise DataLayoutError(f"{folder}: no test images found in good/ or defect-type folders")
    _warn_missing_masks(folder, test, mask_dirs)
    return Split(name=folder.name, train=find_images(folder / "train"), test=test)


def is_category(path: Path) -> bool:
    """True for an MVTec AD category (train/ + test/) or a simple VisA object folder: a dataset
    whose test split is what ``evaluate`` reports on."""
    path = Path(path)
    return ((path / "train").is_dir() and (path / "test").is_dir()) or is_visa_simple(path)


def load_category(path: Path) -> Split:
    """Parse ``path`` as an MVTec AD category (train/good + test/), a simple VisA object folder
    (train/Normal + test/Anomaly) or else a plain folder (has good/)."""
    path = Path(path)
    if not path.is_dir():
        raise DataLayoutError(f"{path}: folder not found")
    if not _is_mvtec_category(path) and is_visa_simple(path):
        return visa_simple(path)
    if (path / "train").is_dir() and (path / "test").is_dir():
        return mvtec_category(path)
    if (path / "good").is_dir():
        return plain_folder(path)
    raise DataLayoutError(
        f"{path}: unknown layout: expected train/ and test/ (MVTec AD category), train/Normal and "
        "test/Anomaly (VisA object) or good/ plus defect-type folders (plain folder)"
    )
