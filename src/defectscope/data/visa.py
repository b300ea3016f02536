"""VisA (Visual Anomaly, Zou et al. ECCV 2022) dataset layouts.

Two layouts are understood:

* **official** — the extracted ``VisA_20220922.tar``: ``root/split_csv/1cls.csv`` with the
  header ``object,split,label,image,mask`` and one folder per object
  (``root/candle/Data/Images/Normal/0000.JPG``, ``root/candle/Data/Masks/Anomaly/000.png``).
  Image and mask paths in the csv are relative to ``root``; ``mask`` is empty for normal rows.
* **simple** — one folder per object: ``train/Normal/*``, ``test/Anomaly/*``, optional
  ``test/Normal/*`` and masks ``Masks/Anomaly/<stem>.*`` matched to anomalies by file stem.

VisA masks are not always 0/255: some store small class ids (0/1..N). As everywhere in
defectscope, any non-zero mask pixel means "defect".
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataLayoutError
from .images import IMAGE_EXTENSIONS
from .samples import Sample, Split

log = logging.getLogger(__name__)

SPLIT_CSV = Path("split_csv") / "1cls.csv"
"""Where the official 1-class split file lives, relative to the VisA root."""

CSV_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}
_SPLITS = ("train", "test")
_MAX_LISTED = 5  # how many missing paths an error message names


@dataclass(frozen=True)
class _Row:
    line: int
    obj: str
    split: str
    label: int
    image: Path
    mask: Path | None


def is_visa_root(path: str | Path) -> bool:
    """True if ``path`` holds the official VisA split file ``split_csv/1cls.csv``."""
    return (Path(path) / SPLIT_CSV).is_file()


def is_visa_simple(path: str | Path) -> bool:
    """True if ``path`` looks like a simple VisA object folder (``train/Normal`` and ``test/Anomaly``)."""
    path = Path(path)
    train = _child_dir(path, "train")
    test = _child_dir(path, "test")
    return (
        train is not None
        and test is not None
        and _child_dir(train, "normal") is not None
        and _child_dir(test, "anomaly") is not None
    )


def visa_official(root: str | Path, objects: Sequence[str] | None = None) -> list[Split]:
    """Read the official VisA layout through ``root/split_csv/1cls.csv``.

    Returns one :class:`Split` per object (``name`` = object): ``train`` holds the train
    normal images, ``test`` the test rows (label 0/1, defect_type ``"good"``/``"anomaly"``,
    ``mask_path`` for anomalies). Objects come in csv order, or in the order of ``objects``.
    Raises :class:`DataLayoutError` for a missing csv, missing columns, bad values, unknown
    objects, or listed files that do not exist (all missing files are counted).
    """
    root = Path(root)
    csv_path = root / SPLIT_CSV
    rows = _read_split_csv(csv_path)
    available = list(dict.fromkeys(r.obj for r in rows))
    if objects is None:
        wanted = available
    else:
        wanted = list(dict.fromkeys(objects))
        unknown = [o for o in wanted if o not in available]
        if unknown:
            raise DataLayoutError(
                f"{csv_path}: unknown object(s) {', '.join(unknown)}; available: {', '.join(available)}"
            )
    chosen = [r for r in rows if r.obj in set(wanted)]

    missing: list[str] = []
    for r in chosen:
        for rel in (r.image, r.mask):
            if rel is not None and not (root / rel).is_file():
                missing.append(f"line {r.line}: {rel}")
    if missing:
        shown = "; ".join(missing[:_MAX_LISTED])
        more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        raise DataLayoutError(
            f"{csv_path}: {len(missing)} listed file(s) do not exist under {root}: {shown}{more}; "
            "re-extract the VisA archive or point to the folder that holds split_csv/"
        )

    splits = []
    for obj in wanted:
        obj_rows = [r for r in chosen if r.obj == obj]
        train = sorted(root / r.image for r in obj_rows if r.split == "train")
        test = sorted(
            (
                Sample(
                    path=root / r.image,
                    label=r.label,
                    defect_type="anomaly" if r.label else "good",
                    mask_path=None if r.mask is None else root / r.mask,
                )
                for r in obj_rows
                if r.split == "test"
            ),
            key=lambda s: str(s.path),
        )
        if not train or not test:
            raise DataLayoutError(
                f"{csv_path}: object {obj!r} has {len(train)} train and {len(test)} test rows; "
                "need at least one of each"
            )
        splits.append(Split(name=obj, train=train, test=test))
    return splits


def visa_simple(object_dir: str | Path) -> Split:
    """Read a simple per-object VisA folder.

    ``train/Normal/*`` -> train; ``test/Anomaly/*`` -> label 1 (defect_type ``"anomaly"``);
    optional ``test/Normal/*`` -> label 0 (``"good"``). When ``Masks/Anomaly`` exists, every
    anomaly needs exactly one mask with the same file stem (any image extension).
    Folder names are matched case-insensitively. Raises :class:`DataLayoutError` when a
    required folder is missing or empty, or masks are missing or ambiguous.
    """
    object_dir = Path(object_dir)
    if not object_dir.is_dir():
        raise DataLayoutError(
            f"{object_dir}: not a folder; expected a VisA object folder with train/Normal and test/Anomaly"
        )
    train_dir = _required(object_dir, ("train", "Normal"))
    anomaly_dir = _required(object_dir, ("test", "Anomaly"))
    test_root = _child_dir(object_dir, "test")
    normal_test_dir = _child_dir(test_root, "normal") if test_root is not None else None

    train = _images(train_dir)
    anomalies = _images(anomaly_dir)
    for folder, found in ((train_dir, train), (anomaly_dir, anomalies)):
        if not found:
            raise DataLayoutError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    normals = _images(normal_test_dir) if normal_test_dir is not None else []

    masks_root = _child_dir(object_dir, "masks")
    mask_dir = _child_dir(masks_root, "anomaly") if masks_root is not None else None
    mask_for: dict[str, Path] = {}
    if mask_dir is None:
        log.info("%s: no Masks/Anomaly folder; anomalies have no ground-truth masks", object_dir)
    else:
        mask_for = _masks_by_stem(mask_dir, anomalies)

    test = [Sample(path=p, label=0, defect_type="good") for p in normals]
    test += [Sample(path=p, label=1, defect_type="anomaly", mask_path=mask_for.get(p.stem)) for p in anomalies]
    return Split(name=object_dir.name, train=train, test=test)


def _read_split_csv(csv_path: Path) -> list[_Row]:
    """Parse and validate ``1cls.csv`` (paths stay relative to the VisA root)."""
    if not csv_path.is_file():
        raise DataLayoutError(
            f"{csv_path}: VisA split file not found; expected split_csv/1cls.csv under the VisA root "
            "(run `defectscope download visa`)"
        )
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        absent = [c for c in CSV_COLUMNS if c not in header]
        if absent:
            raise DataLayoutError(
                f"{csv_path}: missing column(s) {', '.join(absent)}; header must be {','.join(CSV_COLUMNS)}"
            )
        reader.fieldnames = header
        rows = []
        for rec in reader:
            line = reader.line_num
            vals = {c: (rec.get(c) or "").strip() for c in CSV_COLUMNS}
            if not any(vals.values()):
                continue
            rows.append(_parse_row(csv_path, line, vals))
    if not rows:
        raise DataLayoutError(f"{csv_path}: no rows")
    return rows


def _parse_row(csv_path: Path, line: int, vals: dict[str, str]) -> _Row:
    where = f"{csv_path} line {line}"
    split, label = vals["split"].lower(), vals["label"].lower()
    if not vals["object"] or not vals["image"]:
        raise DataLayoutError(f"{where}: empty object or image field")
    if split not in _SPLITS:
        raise DataLayoutError(f"{where}: split {vals['split']!r} is not train or test")
    if label not in _LABELS:
        raise DataLayoutError(f"{where}: label {vals['label']!r} is not normal or anomaly")
    if split == "train" and label == "anomaly":
        raise DataLayoutError(f"{where}: a train row labelled anomaly; 1cls.csv trains on normal images only")
    mask = Path(vals["mask"]) if vals["mask"] and label == "anomaly" else None
    return _Row(line, vals["object"], split, _LABELS[label], Path(vals["image"]), mask)


def _child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name`` (case-insensitive), or None."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if not parent.is_dir():
        return None
    hits = sorted(c for c in parent.iterdir() if c.is_dir() and c.name.lower() == name.lower())
    return hits[0] if hits else None


def _required(base: Path, parts: tuple[str, ...]) -> Path:
    folder: Path | None = base
    for part in parts:
        folder = _child_dir(folder, part) if folder is not None else None
    if folder is None:
        raise DataLayoutError(
            f"{base}: missing folder {'/'.join(parts)}; a simple VisA object folder needs train/Normal and test/Anomaly"
        )
    return folder


def _images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _masks_by_stem(mask_dir: Path, anomalies: list[Path]) -> dict[str, Path]:
    by_stem: dict[str, list[Path]] = {}
    for m in _images(mask_dir):
        by_stem.setdefault(m.stem, []).append(m)
    ambiguous = [f"{s}: {', '.join(p.name for p in ps)}" for s, ps in by_stem.items() if len(ps) > 1]
    if ambiguous:
        raise DataLayoutError(f"{mask_dir}: several masks share a stem ({'; '.join(ambiguous[:_MAX_LISTED])})")
    missing = [a.name for a in anomalies if a.stem not in by_stem]
    if missing:
        more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        raise DataLayoutError(
            f"{mask_dir}: no mask for {len(missing)} anomaly image(s): {', '.join(missing[:_MAX_LISTED])}{more}; "
            "masks must share the image's file stem"
        )
    return {stem: ps[0] for stem, ps in by_stem.items()}
