"""The synthetic MVTec-layout generator: deterministic, parseable, masks exactly on defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import DEFECT_TYPES, make_mvtec_category

from defectscope.data.images import load_image, load_mask
from defectscope.data.layouts import mvtec_category


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec_category(tmp_path_factory.mktemp("syn"), n_train=6, n_test_good=4, n_test_defect=6, size=64)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make_mvtec_category(tmp_path / "a", n_train=3, n_test_good=2, n_test_defect=3, size=48, seed=5)
    b = make_mvtec_category(tmp_path / "b", n_train=3, n_test_good=2, n_test_defect=3, size=48, seed=5)
    c = make_mvtec_category(tmp_path / "c", n_train=3, n_test_good=2, n_test_defect=3, size=48, seed=6)
    assert tree_bytes(a) == tree_bytes(b)
    assert tree_bytes(a).keys() == tree_bytes(c).keys() and tree_bytes(a) != tree_bytes(c)


def test_layout_parses(category: Path) -> None:
    assert category.name == "synthetic"
    split = mvtec_category(category)
    assert len(split.train) == 6
    counts = {t: sum(s.defect_type == t for s in split.test) for t in ("good", *DEFECT_TYPES)}
    assert counts == {"good": 4, "scratch": 3, "spot": 3}
    for path in split.train + [s.path for s in split.test]:
        image = load_image(path)
        assert image.shape == (64, 64, 3)


def test_masks_exactly_for_defects(category: Path) -> None:
    split = mvtec_category(category)
    for sample in split.test:
        if sample.label == 0:
            assert sample.mask_path is None
            continue
        assert sample.mask_path is not None
        mask = load_mask(sample.mask_path)
        assert mask.shape == (64, 64)
        assert 0.003 < mask.mean() < 0.1  # small but real
        raw = np.unique(np.asarray(Image.open(sample.mask_path)))
        assert set(raw.tolist()) == {0, 255}


def test_defect_pixels_differ_from_texture(category: Path) -> None:
    split = mvtec_category(category)
    train = np.stack([load_image(p).astype(float) for p in split.train])
    mean_colour = train.reshape(-1, 3).mean(0)
    spread = train.reshape(-1, 3).std(0).mean()
    for sample in split.test:
        if sample.label == 1:
            image = load_image(sample.path).astype(float)
            mask = load_mask(sample.mask_path)
            inside = image[mask].mean(0)
            assert np.abs(inside - mean_colour).max() > 2 * spread  # clearly visible locally
            assert np.abs(image.mean((0, 1)) - mean_colour).max() < spread  # but not in the global mean


def test_good_images_vary_but_share_a_distribution(category: Path) -> None:
    train = [load_image(p).astype(float) for p in mvtec_category(category).train]
    assert not np.array_equal(train[0], train[1])
    means = np.array([t.mean() for t in train])
    assert means.std() < 5


@pytest.mark.parametrize("ext", [".jpg", ".bmp", ".tif"])
def test_other_extensions(tmp_path: Path, ext: str) -> None:
    folder = make_mvtec_category(tmp_path, n_train=2, n_test_good=1, n_test_defect=2, size=32, ext=ext)
    split = mvtec_category(folder)
    assert all(p.suffix == ext for p in split.train)
    assert sum(s.mask_path is not None for s in split.test) == 2
