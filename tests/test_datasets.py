"""data.datasets.discover / load_splits and the layouts fit and evaluate accept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.datasets import discover, load_splits
from defectscope.data.layouts import good_images, load_category
from defectscope.errors import DataLayoutError


def _img(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path, format="PNG")
    return path


def _mvtec(cat: Path) -> Path:
    _img(cat / "train/good/0.png")
    _img(cat / "train/good/1.png")
    _img(cat / "test/good/0.png")
    _img(cat / "test/crack/0.png", 200)
    _img(cat / "ground_truth/crack/0_mask.png", 255)
    return cat


def _visa_simple(obj: Path) -> Path:
    _img(obj / "train/Normal/a.png")
    _img(obj / "train/Normal/b.png")
    _img(obj / "test/Normal/n.png")
    _img(obj / "test/Anomaly/x.png", 200)
    _img(obj / "Masks/Anomaly/x.png", 255)
    return obj


def _visa_root(root: Path) -> Path:
    rows = []
    for obj in ("candle", "pcb1"):
        rows += [
            f"{obj},train,normal,{obj}/Data/Images/Normal/0.png,",
            f"{obj},test,normal,{obj}/Data/Images/Normal/1.png,",
            f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/0.png,{obj}/Data/Masks/Anomaly/0.png",
        ]
        for rel in ("Images/Normal/0.png", "Images/Normal/1.png", "Images/Anomaly/0.png", "Masks/Anomaly/0.png"):
            _img(root / obj / "Data" / rel)
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text("object,split,label,image,mask\n" + "\n".join(rows) + "\n")
    return root


def _plain(folder: Path, train: bool = True) -> Path:
    _img(folder / "good/g.png")
    _img(folder / "dent/d.png", 200)
    if train:
        _img(folder / "train/t0.png")
        _img(folder / "train/sub/t1.png")
    return folder


def test_mvtec_root_and_single_category(tmp_path: Path) -> None:
    _mvtec(tmp_path / "root/bottle")
    _mvtec(tmp_path / "root/cable")
    (tmp_path / "root/notes").mkdir()
    found = discover(tmp_path / "root")
    assert [(c.name, c.layout) for c in found] == [("bottle", "mvtec"), ("cable", "mvtec")]
    splits = load_splits(tmp_path / "root", ["cable"])
    assert [s.name for s in splits] == ["cable"] and len(splits[0].train) == 2 and len(splits[0].test) == 2
    assert [c.name for c in discover(tmp_path / "root/bottle")] == ["bottle"]


def test_visa_root_and_simple_object(tmp_path: Path) -> None:
    root = _visa_root(tmp_path / "visa")
    found = discover(root)
    assert [(c.name, c.layout) for c in found] == [("candle", "visa"), ("pcb1", "visa")]
    (split,) = load_splits(root, ["pcb1"])
    assert split.name == "pcb1" and [s.label for s in split.test] == [1, 0]
    assert all(s.mask_path is not None for s in split.test if s.label)

    obj = _visa_simple(tmp_path / "simple/capsules")
    (split,) = load_splits(obj)
    assert split.name == "capsules" and len(split.train) == 2 and sorted(s.label for s in split.test) == [0, 1]
    assert [c.layout for c in discover(tmp_path / "simple")] == ["visa_simple"]  # a root of VisA objects
    # fit and evaluate accept it too
    assert good_images(obj) == sorted((obj / "train/Normal").glob("*.png"))
    assert load_category(obj) == split


def test_plain_folder(tmp_path: Path) -> None:
    folder = _plain(tmp_path / "parts")
    (split,) = load_splits(folder)
    assert [c.layout for c in discover(folder)] == ["plain"]
    assert split.train == [folder / "train/sub/t1.png", folder / "train/t0.png"]
    assert good_images(folder) == split.train
    bare = _plain(tmp_path / "bare", train=False)
    assert load_splits(bare)[0].train == []
    with pytest.raises(DataLayoutError, match="without train/"):
        good_images(bare)
    # a folder holding only good/ is still a folder of good images
    _img(tmp_path / "goods/good/a.png")
    assert good_images(tmp_path / "goods") == [tmp_path / "goods/good/a.png"]


def test_errors_name_path_and_valid_categories(tmp_path: Path) -> None:
    _mvtec(tmp_path / "root/bottle")
    with pytest.raises(DataLayoutError, match=r"unknown category nope; valid: bottle"):
        discover(tmp_path / "root", ["nope"])
    with pytest.raises(DataLayoutError, match=r"unknown category x; valid: candle, pcb1"):
        discover(_visa_root(tmp_path / "visa"), ["pcb1", "x"])
    _img(tmp_path / "junk/a.png")
    with pytest.raises(DataLayoutError, match="no dataset found") as info:
        discover(tmp_path / "junk")
    assert str(tmp_path / "junk") in str(info.value)
    with pytest.raises(DataLayoutError, match="not found"):
        discover(tmp_path / "missing")
    # a malformed category is found, and fails only when loaded
    (tmp_path / "root/broken/train/good").mkdir(parents=True)
    (tmp_path / "root/broken/test").mkdir()
    broken = discover(tmp_path / "root", ["broken"])[0]
    with pytest.raises(DataLayoutError, match="no training images"):
        broken.load()
