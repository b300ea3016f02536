"""Turn one DATA path into the categories it holds, whatever its layout.

Understood, in the order they are tried:

* a **VisA root** (``split_csv/1cls.csv``): every object in the csv;
* a single **MVTec AD category** (``train/good`` + ``test/``);
* a single **simple VisA object** folder (``train/Normal`` + ``test/Anomaly``);
* a **plain folder** (``good/`` + defect-type folders; train images from ``train/`` if present);
* a **root** whose sub-folders are MVTec AD categories or simple VisA objects (e.g. the MVTec AD root).

:func:`discover` only names the categories; each is parsed when its :meth:`Category.load` is
called, so one malformed category does not stop the others (the benchmark relies on this).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataLayoutError
from .layouts import mvtec_category, plain_folder
from .samples import Split
from .visa import SPLIT_CSV, is_visa_root, is_visa_simple, visa_official, visa_simple


@dataclass(frozen=True)
class Category:
    """One category of a dataset, parsed on demand.

    name: the category (MVTec AD category / VisA object / folder name).
    layout: "mvtec", "visa", "visa_simple" or "plain".
    path: the category folder (the VisA root for the official layout).
    """

    name: str
    layout: str
    path: Path
    _loader: Callable[[], Split]

    def load(self) -> Split:
        """Parse the category; raises DataLayoutError when it is malformed."""
        return self._loader()


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()


def _visa_objects(root: Path) -> list[str]:
    """Object names of the official VisA csv, in csv order (rows are validated when loaded)."""
    with (root / SPLIT_CSV).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "object" not in header:
            raise DataLayoutError(f"{root / SPLIT_CSV}: no 'object' column; is this the VisA split file?")
        reader.fieldnames = header
        names = dict.fromkeys((row.get("object") or "").strip() for row in reader)
    return [name for name in names if name]


def _one(folder: Path) -> Category | None:
    """The category that ``folder`` itself is, or None."""
    if _is_mvtec_category(folder):
        return Category(folder.name, "mvtec", folder, lambda: mvtec_category(folder))
    if is_visa_simple(folder):
        return Category(folder.name, "visa_simple", folder, lambda: visa_simple(folder))
    return None


def discover(path: str | Path, categories: Sequence[str] | None = None) -> list[Category]:
    """The categories under ``path`` (layouts in the module docstring), optionally only ``categories``.

    Raises DataLayoutError when ``path`` is missing or holds no known layout, or when a name in
    ``categories`` is not there (the message lists the valid names).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataLayoutError(f"{path}: folder not found")
    found: list[Category]
    if is_visa_root(path):
        found = [
            Category(name, "visa", path, lambda name=name: visa_official(path, [name])[0])
            for name in _visa_objects(path)
        ]
    elif (single := _one(path)) is not None:
        found = [single]
    elif (path / "good").is_dir():
        found = [Category(path.name, "plain", path, lambda: plain_folder(path))]
    else:
        subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = [c for c in (_one(p) for p in subs) if c is not None]
        if not found:
            raise DataLayoutError(
                f"{path}: no dataset found: expected an MVTec AD root or category (train/good + test/), "
                "a VisA root (split_csv/1cls.csv) or object (train/Normal + test/Anomaly), "
                "or a plain folder (good/ + defect-type folders)"
            )
    if categories:
        names = [c.name for c in found]
        unknown = [n for n in dict.fromkeys(categories) if n not in names]
        if unknown:
            raise DataLayoutError(
                f"{path}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                f"valid: {', '.join(names)}"
            )
        wanted = set(categories)
        found = [c for c in found if c.name in wanted]
    return found


def load_splits(path: str | Path, categories: Sequence[str] | None = None) -> list[Split]:
    """Parse every category under ``path`` (see :func:`discover`); the first malformed one raises."""
    return [c.load() for c in discover(path, categories)]
