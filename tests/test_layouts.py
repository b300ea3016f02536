"""find_images, expand_paths, good_images, dataset layouts and the ELPV split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import make_mvtec_category

from defectscope.data import elpv
from defectscope.data.layouts import (
    expand_paths,
    find_images,
    good_images,
    load_category,
    mvtec_category,
    mvtec_root,
    plain_folder,
)
from defectscope.data.samples import Sample
from defectscope.errors import DataLayoutError, DefectscopeError

REAL_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def touch_image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() not in (".jpg", ".jpeg", ".bmp", ".tif", ".tiff") else None
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec_category(tmp_path_factory.mktemp("mvtec"), n_train=5, n_test_good=3, n_test_defect=5, size=32)


# --- find_images -------------------------------------------------------------------------------


def test_find_images_sorted_filtered_recursive(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "sub/c.tif", "sub/deep/d.bmp", "e.jpeg", "f.TIFF"]:
        touch_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    touch_image(tmp_path / ".hidden.png")
    touch_image(tmp_path / ".cache" / "g.png")
    (tmp_path / "folder.png").mkdir()
    found = find_images(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == sorted(rel)
    assert set(rel) == {"b.png", "a.JPG", "sub/c.tif", "sub/deep/d.bmp", "e.jpeg", "f.TIFF"}
    flat = [p.name for p in find_images(tmp_path, recursive=False)]
    assert flat == sorted(["b.png", "a.JPG", "e.jpeg", "f.TIFF"])
    assert find_images(tmp_path / "nope") == []


# --- expand_paths ------------------------------------------------------------------------------


def test_expand_paths_files_folders_globs_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = touch_image(tmp_path / "a.png")
    b = touch_image(tmp_path / "b.jpg")
    c = touch_image(tmp_path / "dir" / "c.png")
    d = touch_image(tmp_path / "dir" / "sub" / "d.png")
    odd = tmp_path / "weird.dat"
    odd.write_text("maybe an image")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["b.jpg", str(tmp_path / "dir"), "*.png", "weird.dat", "missing.png", "empty", "*.gif", "a.png", "**/d.png"]
    paths, errors = expand_paths(args)
    # given order; folders and globs add each image once, a file named as an argument is always listed
    assert [p.resolve() for p in paths] == [b, c, d, a, odd, a]
    assert [arg for arg, _ in errors] == ["missing.png", "empty", "*.gif"]
    messages = dict(errors)
    assert "no such file" in messages["missing.png"]
    assert "no image" in messages["empty"]
    assert "no image" in messages["*.gif"]


def test_expand_paths_recursive_glob_and_relative_paths_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch_image(tmp_path / "x" / "1.jpg")
    touch_image(tmp_path / "x" / "y" / "2.jpg")
    touch_image(tmp_path / "x" / "y" / "3.png")
    monkeypatch.chdir(tmp_path)
    paths, errors = expand_paths(["**/*.jpg"])
    assert errors == []
    assert [p.as_posix() for p in paths] == ["x/1.jpg", "x/y/2.jpg"]


def test_expand_paths_home_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch_image(tmp_path / "pic.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    paths, errors = expand_paths(["~/pic.png", "~/*.png"])
    assert errors == [] and len(paths) == 1 and paths[0].resolve() == (tmp_path / "pic.png").resolve()


# --- good_images -------------------------------------------------------------------------------


def test_good_images_mvtec_and_plain(synthetic: Path, tmp_path: Path) -> None:
    assert good_images(synthetic) == sorted((synthetic / "train" / "good").glob("*.png"))
    for i in range(3):
        touch_image(tmp_path / "goods" / f"sub{i % 2}" / f"{i}.png")
    assert len(good_images(tmp_path / "goods", min_images=3)) == 3


def test_good_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DataLayoutError, match="not found"):
        good_images(tmp_path / "nope")
    touch_image(tmp_path / "few" / "1.png")
    with pytest.raises(DataLayoutError, match=r"found 1 good image.*at least 2") as info:
        good_images(tmp_path / "few", min_images=2)
    assert str(tmp_path / "few") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match="found 0"):
        good_images(tmp_path / "empty")


# --- mvtec_category ----------------------------------------------------------------------------


def test_mvtec_category_on_synthetic(synthetic: Path) -> None:
    split = mvtec_category(synthetic)
    assert split.name == "synthetic"
    assert split.train == sorted((synthetic / "train" / "good").glob("*.png")) and len(split.train) == 5
    by_type: dict[str, list[Sample]] = {}
    for s in split.test:
        by_type.setdefault(s.defect_type, []).append(s)
    assert {k: len(v) for k, v in by_type.items()} == {"good": 3, "scratch": 3, "spot": 2}
    for s in split.test:
        assert s.path.parent.name == s.defect_type
        if s.defect_type == "good":
            assert s.label == 0 and s.mask_path is None
        else:
            assert s.label == 1
            assert s.mask_path == synthetic / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"


@pytest.mark.parametrize("ext", [".jpg", ".bmp", ".tif", ".JPEG"])
def test_mvtec_category_other_formats(tmp_path: Path, ext: str) -> None:
    root = tmp_path / "cat"
    touch_image(root / "train" / "good" / f"000{ext}")
    touch_image(root / "train" / "good" / f"001{ext}")
    touch_image(root / "test" / "good" / f"000{ext}")
    touch_image(root / "test" / "crack" / f"000{ext}")
    touch_image(root / "test" / "crack" / f"001{ext}")
    touch_image(root / "ground_truth" / "crack" / "000_mask.bmp")
    touch_image(root / "ground_truth" / "crack" / "001_mask.tif")
    split = mvtec_category(root)
    assert len(split.train) == 2
    crack = [s for s in split.test if s.label == 1]
    assert [s.mask_path.name for s in crack if s.mask_path] == ["000_mask.bmp", "001_mask.tif"]


def test_mvtec_category_missing_masks_warns_with_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cat"
    touch_image(root / "train" / "good" / "0.png")
    touch_image(root / "test" / "good" / "0.png")
    for i in range(3):
        touch_image(root / "test" / "dent" / f"{i}.png")
    touch_image(root / "ground_truth" / "dent" / "1_mask.png")
    with caplog.at_level(logging.WARNING, logger="defectscope.data.layouts"):
        split = mvtec_category(root)
    masks = [s.mask_path for s in split.test if s.label == 1]
    assert masks[0] is None and masks[1] is not None and masks[2] is None
    assert any("2 of 3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "make, missing",
    [
        (["test/good/0.png"], "train/good/"),
        (["train/good/0.png"], "test/"),
        ([], "train/good/ and test/"),
    ],
)
def test_mvtec_category_malformed(tmp_path: Path, make: list[str], missing: str) -> None:
    root = tmp_path / "cat"
    root.mkdir()
    for rel in make:
        touch_image(root / rel)
    with pytest.raises(DataLayoutError, match=f"missing {missing}") as info:
        mvtec_category(root)
    assert str(root) in str(info.value)


def test_mvtec_category_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="no training images"):
        mvtec_category(root)
    touch_image(root / "train" / "good" / "0.png")
    with pytest.raises(DataLayoutError, match="no test images"):
        mvtec_category(root)
    with pytest.raises(DataLayoutError, match="not found"):
        mvtec_category(tmp_path / "nope")


def test_mvtec_root(tmp_path: Path) -> None:
    make_mvtec_category(tmp_path, "b_cat", n_train=1, n_test_good=1, n_test_defect=1, size=16)
    make_mvtec_category(tmp_path, "a_cat", n_train=1, n_test_good=1, n_test_defect=1, size=16)
    (tmp_path / "not_a_category").mkdir()
    assert mvtec_root(tmp_path) == [tmp_path / "a_cat", tmp_path / "b_cat"]
    with pytest.raises(DataLayoutError, match="no MVTec AD categories"):
        mvtec_root(tmp_path / "not_a_category")


# --- plain_folder / load_category --------------------------------------------------------------


def test_plain_folder(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    touch_image(root / "good" / "g1.png")
    touch_image(root / "good" / "g2.jpg")
    touch_image(root / "bent" / "x.png")
    touch_image(root / "bent" / "y.png")
    touch_image(root / "cut" / "z.bmp")
    touch_image(root / "masks" / "bent" / "x_mask.png")
    touch_image(root / "masks" / "cut" / "z.png")
    split = plain_folder(root)
    assert split.name == "plain" and split.train == []
    assert [(s.path.name, s.label, s.defect_type) for s in split.test] == [
        ("g1.png", 0, "good"),
        ("g2.jpg", 0, "good"),
        ("x.png", 1, "bent"),
        ("y.png", 1, "bent"),
        ("z.bmp", 1, "cut"),
    ]
    masks = {s.path.name: s.mask_path for s in split.test}
    assert masks["x.png"] == root / "masks" / "bent" / "x_mask.png"
    assert masks["y.png"] is None
    assert masks["z.bmp"] == root / "masks" / "cut" / "z.png"
    touch_image(root / "train" / "t.png")
    assert plain_folder(root).train == [root / "train" / "t.png"]
    assert all(s.defect_type != "train" for s in plain_folder(root).test)


def test_plain_folder_errors(tmp_path: Path) -> None:
    touch_image(tmp_path / "p" / "dent" / "x.png")
    with pytest.raises(DataLayoutError, match="missing good/"):
        plain_folder(tmp_path / "p")
    (tmp_path / "q" / "good").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="no test images"):
        plain_folder(tmp_path / "q")


def test_load_category_detects_layout(synthetic: Path, tmp_path: Path) -> None:
    assert load_category(synthetic) == mvtec_category(synthetic)
    touch_image(tmp_path / "plain" / "good" / "a.png")
    assert load_category(tmp_path / "plain").test[0].defect_type == "good"
    touch_image(tmp_path / "junk" / "a.png")
    with pytest.raises(DataLayoutError, match="unknown layout") as info:
        load_category(tmp_path / "junk")
    assert str(tmp_path / "junk") in str(info.value)
    with pytest.raises(DataLayoutError, match="not found"):
        load_category(tmp_path / "nothing")


@pytest.mark.real
@pytest.mark.skipif(not REAL_BOTTLE.is_dir(), reason="MVTec AD bottle not present")
def test_mvtec_category_real_bottle() -> None:
    split = mvtec_category(REAL_BOTTLE)
    assert split.name == "bottle" and len(split.train) == 209
    assert sum(s.label == 0 for s in split.test) == 20 and sum(s.label == 1 for s in split.test) == 63
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in split.test if s.label == 1)


# --- ELPV --------------------------------------------------------------------------------------

needs_elpv = pytest.mark.skipif(not elpv.elpv_available(), reason="elpv-dataset not installed")


@needs_elpv
def test_elpv_split_counts_and_labels() -> None:
    split = elpv.elpv_split()
    assert split.name == "elpv-mono"
    assert len(split.train) == 200
    good = [s for s in split.test if s.label == 0]
    bad = [s for s in split.test if s.label == 1]
    assert len(good) == 100 and len(bad) == 313
    assert all(s.defect_type == "defective" and s.mask_path is None for s in bad)
    assert not set(split.train) & {s.path for s in good}
    assert all(p.is_file() for p in split.train[:5])
    poly = elpv.elpv_split("poly", n_train=None, test_good=20)
    assert len(poly.train) == 900 and sum(s.label == 1 for s in poly.test) == 402


@needs_elpv
def test_elpv_split_matches_labels_file() -> None:
    data = elpv._data_dir()
    assert data is not None
    rows = [line.split() for line in (data / "labels.csv").read_text().splitlines() if line.strip()]
    good = {data / r[0] for r in rows if r[2] == "mono" and float(r[1]) == 0.0}
    bad = {data / r[0] for r in rows if r[2] == "mono" and float(r[1]) == 1.0}
    split = elpv.elpv_split("mono", n_train=None, test_good=0)
    assert set(split.train) == good and {s.path for s in split.test} == bad


@needs_elpv
def test_elpv_split_deterministic_per_seed() -> None:
    a, b, c = elpv.elpv_split(seed=0), elpv.elpv_split(seed=0), elpv.elpv_split(seed=1)
    assert a == b
    assert a.train != c.train


@needs_elpv
def test_elpv_split_bad_arguments() -> None:
    with pytest.raises(DefectscopeError, match="cell type"):
        elpv.elpv_split("amorphous")
    with pytest.raises(DefectscopeError, match="588 good"):
        elpv.elpv_split("mono", n_train=500, test_good=100)
    with pytest.raises(DefectscopeError):
        elpv.elpv_split("mono", n_train=None, test_good=None)


def test_elpv_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elpv, "_data_dir", lambda: None)
    assert not elpv.elpv_available()
    with pytest.raises(DataLayoutError, match="pip install elpv-dataset"):
        elpv.elpv_split()
