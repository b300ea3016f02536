"""The demo's real dataset: ELPV electroluminescence solar-cell images (pip package ``elpv-dataset``).

The package ships ``data/labels.csv`` (whitespace-separated, no header: path, defect
probability, cell type mono/poly) and ``data/images/cellNNNN.png`` (300 x 300 grayscale).
The CSV is read here directly; the package's own ``load_dataset`` would decode every image.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from ..errors import DataLayoutError, DefectscopeError
from .samples import Sample, Split

log = logging.getLogger(__name__)

CELL_TYPES: tuple[str, ...] = ("mono", "poly")
_INSTALL_HINT = "install it with `pip install elpv-dataset`"


def _data_dir() -> Path | None:
    """The package's data/ folder, or None when elpv_dataset is not installed."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def elpv_available() -> bool:
    """True when the elpv-dataset package and its labels.csv are installed."""
    data = _data_dir()
    return data is not None and (data / "labels.csv").is_file()


def _read_labels(data: Path) -> list[tuple[Path, float, str]]:
    """(image path, defect probability, cell type) for every row of labels.csv."""
    rows = []
    csv = data / "labels.csv"
    for number, line in enumerate(csv.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise DataLayoutError(f"{csv}: line {number} should have 3 fields (path, probability, type): {line!r}")
        rows.append((data / fields[0], float(fields[1]), fields[2]))
    return rows


def elpv_split(cell_type: str = "mono", n_train: int | None = 200, seed: int = 0, test_good: int | None = 100) -> Split:
    """Good/defective split of the ELPV cells of one type.

    Good = defect probability 0.0, defective = 1.0; cells rated 1/3 or 2/3 are left out
    (uncertain labels). The good cells are shuffled with ``seed``: the first ``n_train``
    train, the next ``test_good`` are test samples with label 0. Every defective cell of
    that type is a test sample with label 1 (defect_type "defective", no masks).
    ``n_train=None`` takes all good cells not used for testing; ``test_good=None`` all
    good cells not used for training.

    Counts in elpv-dataset 1.x (2624 cells):

    * mono: 588 good, 313 defective (117 at 1/3 and 56 at 2/3 left out);
      defaults give 200 train, test = 100 good + 313 defective.
    * poly: 920 good, 402 defective (178 at 1/3 and 50 at 2/3 left out).

    Raises DataLayoutError if the package is missing, DefectscopeError for a bad argument.
    """
    if cell_type not in CELL_TYPES:
        raise DefectscopeError(f"unknown ELPV cell type {cell_type!r}; choose one of {', '.join(CELL_TYPES)}")
    data = _data_dir()
    if data is None or not (data / "labels.csv").is_file():
        raise DataLayoutError(f"the ELPV dataset is not installed; {_INSTALL_HINT}")
    rows = [(path, prob) for path, prob, kind in _read_labels(data) if kind == cell_type]
    good = sorted(path for path, prob in rows if prob == 0.0)
    defective = sorted(path for path, prob in rows if prob == 1.0)

    if n_train is None and test_good is None:
        raise DefectscopeError("elpv_split: give n_train or test_good (at most one of them may be None)")
    if (n_train is not None and n_train < 0) or (test_good is not None and test_good < 0):
        raise DefectscopeError(f"elpv_split: counts must be >= 0, got n_train={n_train}, test_good={test_good}")
    n_tr = len(good) - test_good if n_train is None else n_train  # type: ignore[operator]
    n_te = len(good) - n_train if test_good is None else test_good  # type: ignore[operator]
    if n_tr < 0 or n_te < 0 or n_tr + n_te > len(good):
        raise DefectscopeError(
            f"elpv_split: {cell_type} has {len(good)} good cells, cannot take n_train={n_train} and "
            f"test_good={test_good}"
        )
    order = np.random.default_rng(seed).permutation(len(good))
    shuffled = [good[i] for i in order]
    train = shuffled[:n_tr]
    test = [Sample(path=p, label=0, defect_type="good") for p in shuffled[n_tr : n_tr + n_te]]
    test += [Sample(path=p, label=1, defect_type="defective") for p in defective]
    log.info("ELPV %s: %d train, %d good + %d defective test cells", cell_type, len(train), n_te, len(defective))
    return Split(name=f"elpv-{cell_type}", train=train, test=test)
