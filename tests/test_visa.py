"""VisA layouts on tiny synthetic trees (official split csv and simple per-object folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.samples import Sample
from defectscope.data.visa import is_visa_root, is_visa_simple, visa_official, visa_simple
from defectscope.errors import DataLayoutError

HEADER = "object,split,label,image,mask"


def _img(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path, format="PNG")
    return path


def _mask(path: Path, on: int) -> Path:
    """A mask whose defect pixels hold ``on`` (255, or VisA-style small ids like 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((6, 6), np.uint8)
    arr[1:3, 2:5] = on
    Image.fromarray(arr).save(path)
    return path


def _official(root: Path, rows: list[str] | None = None) -> Path:
    """Two objects: candle (2 train, 1 good + 2 anomalous test) and pcb1 (1 train, 1 anomalous test)."""
    for rel, v in [
        ("candle/Data/Images/Normal/0000.JPG", 10),
        ("candle/Data/Images/Normal/0001.JPG", 20),
        ("candle/Data/Images/Normal/0002.JPG", 30),
        ("candle/Data/Images/Anomaly/000.JPG", 200),
        ("candle/Data/Images/Anomaly/001.JPG", 210),
        ("pcb1/Data/Images/Normal/0000.JPG", 40),
        ("pcb1/Data/Images/Anomaly/000.JPG", 220),
    ]:
        _img(root / rel, v)
    _mask(root / "candle/Data/Masks/Anomaly/000.png", 255)
    _mask(root / "candle/Data/Masks/Anomaly/001.png", 1)
    _mask(root / "pcb1/Data/Masks/Anomaly/000.png", 3)
    if rows is None:
        rows = [
            "candle,train,normal,candle/Data/Images/Normal/0001.JPG,",
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
            "candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,candle/Data/Masks/Anomaly/001.png",
            "candle,test,normal,candle/Data/Images/Normal/0002.JPG,",
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
            "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
            "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png",
        ]
    csv = root / "split_csv" / "1cls.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("\n".join([HEADER, *rows]) + "\n")
    return root


def test_official_layout_counts_labels_masks(tmp_path):
    root = _official(tmp_path)
    assert is_visa_root(root) and not is_visa_simple(root)
    candle, pcb1 = visa_official(root)
    assert (candle.name, pcb1.name) == ("candle", "pcb1")
    assert candle.train == [root / "candle/Data/Images/Normal/0000.JPG", root / "candle/Data/Images/Normal/0001.JPG"]
    assert candle.test == [
        Sample(root / "candle/Data/Images/Anomaly/000.JPG", 1, "anomaly", root / "candle/Data/Masks/Anomaly/000.png"),
        Sample(root / "candle/Data/Images/Anomaly/001.JPG", 1, "anomaly", root / "candle/Data/Masks/Anomaly/001.png"),
        Sample(root / "candle/Data/Images/Normal/0002.JPG", 0, "good", None),
    ]
    assert [(s.label, s.defect_type) for s in pcb1.test] == [(1, "anomaly")]
    # whatever the stored value (255, 1, 3), the defect region is the non-zero pixels
    for s in candle.test + pcb1.test:
        if s.mask_path is not None:
            assert (np.array(Image.open(s.mask_path)) != 0).sum() == 6


def test_official_object_filter_keeps_requested_order(tmp_path):
    root = _official(tmp_path)
    assert [s.name for s in visa_official(root, ["pcb1", "candle"])] == ["pcb1", "candle"]
    with pytest.raises(DataLayoutError, match=r"unknown object\(s\) fryum; available: candle, pcb1"):
        visa_official(root, ["fryum"])


def test_official_missing_csv(tmp_path):
    with pytest.raises(DataLayoutError, match=r"split_csv/1cls.csv.*not found"):
        visa_official(tmp_path)
    assert not is_visa_root(tmp_path)


def test_official_missing_columns(tmp_path):
    root = _official(tmp_path)
    (root / "split_csv/1cls.csv").write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(DataLayoutError, match=r"1cls.csv: missing column\(s\) label, mask"):
        visa_official(root)


def test_official_missing_files_are_all_counted(tmp_path):
    root = _official(tmp_path)
    (root / "candle/Data/Images/Normal/0000.JPG").unlink()
    (root / "candle/Data/Masks/Anomaly/001.png").unlink()
    (root / "pcb1/Data/Images/Anomaly/000.JPG").unlink()
    with pytest.raises(DataLayoutError) as info:
        visa_official(root)
    msg = str(info.value)
    assert "1cls.csv: 3 listed file(s) do not exist" in msg
    assert "line 3: candle/Data/Images/Normal/0000.JPG" in msg
    assert "candle/Data/Masks/Anomaly/001.png" in msg and "pcb1/Data/Images/Anomaly/000.JPG" in msg
    _img(root / "pcb1/Data/Images/Anomaly/000.JPG")  # only the requested object's files are checked
    assert [s.name for s in visa_official(root, ["pcb1"])] == ["pcb1"]


def test_official_missing_files_list_is_capped(tmp_path):
    rows = [f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.png," for i in range(100, 112)]
    root = _official(tmp_path, [*rows, "candle,test,normal,candle/Data/Images/Normal/0002.JPG,"])
    with pytest.raises(DataLayoutError, match=r"12 listed file\(s\).*\(and 7 more\)"):
        visa_official(root)


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ("candle,val,normal,candle/Data/Images/Normal/0000.JPG,", "line 2: split 'val'"),
        ("candle,test,bad,candle/Data/Images/Normal/0000.JPG,", "line 2: label 'bad'"),
        ("candle,train,anomaly,candle/Data/Images/Anomaly/000.JPG,", "line 2: a train row labelled anomaly"),
    ],
)
def test_official_bad_values_name_the_row(tmp_path, row, why):
    root = _official(tmp_path, [row, "candle,test,normal,candle/Data/Images/Normal/0002.JPG,"])
    with pytest.raises(DataLayoutError, match=why):
        visa_official(root)


def test_official_object_without_test_rows(tmp_path):
    root = _official(tmp_path, ["candle,train,normal,candle/Data/Images/Normal/0000.JPG,"])
    with pytest.raises(DataLayoutError, match="object 'candle' has 1 train and 0 test rows"):
        visa_official(root)


def _simple(obj: Path, with_normal_test: bool = True, masks: bool = True) -> Path:
    _img(obj / "train/Normal/a.JPG")
    _img(obj / "train/Normal/b.png")
    _img(obj / "test/Anomaly/x.JPG", 200)
    _img(obj / "test/Anomaly/y.JPG", 210)
    (obj / "train/Normal/notes.txt").write_text("not an image")
    if with_normal_test:
        _img(obj / "test/Normal/n.jpg", 30)
    if masks:
        _mask(obj / "Masks/Anomaly/x.png", 255)
        _mask(obj / "Masks/Anomaly/y.png", 1)
    return obj


def test_simple_layout(tmp_path):
    obj = _simple(tmp_path / "cashew")
    assert is_visa_simple(obj) and not is_visa_root(obj)
    split = visa_simple(obj)
    assert split.name == "cashew"
    assert split.train == [obj / "train/Normal/a.JPG", obj / "train/Normal/b.png"]
    assert split.test == [
        Sample(obj / "test/Normal/n.jpg", 0, "good", None),
        Sample(obj / "test/Anomaly/x.JPG", 1, "anomaly", obj / "Masks/Anomaly/x.png"),
        Sample(obj / "test/Anomaly/y.JPG", 1, "anomaly", obj / "Masks/Anomaly/y.png"),
    ]
    for s in split.test[1:]:
        assert (np.array(Image.open(s.mask_path)) != 0).sum() == 6  # 0/255 and 0/1 masks alike


def test_simple_without_normal_test_or_masks(tmp_path):
    split = visa_simple(_simple(tmp_path / "fryum", with_normal_test=False, masks=False))
    assert [(s.label, s.mask_path) for s in split.test] == [(1, None), (1, None)]


def test_simple_folder_names_case_insensitive(tmp_path):
    obj = tmp_path / "pcb2"
    _img(obj / "train/normal/a.png")
    _img(obj / "test/anomaly/x.png")
    _mask(obj / "masks/anomaly/x.png", 1)
    assert is_visa_simple(obj)
    split = visa_simple(obj)
    assert split.test[0].mask_path == obj / "masks/anomaly/x.png"


def test_simple_missing_folders(tmp_path):
    obj = tmp_path / "candle"
    _img(obj / "train/Normal/a.png")
    assert not is_visa_simple(obj)
    with pytest.raises(DataLayoutError, match=r"candle: missing folder test/Anomaly"):
        visa_simple(obj)
    with pytest.raises(DataLayoutError, match="missing folder train/Normal"):
        visa_simple(tmp_path)
    with pytest.raises(DataLayoutError, match="not a folder"):
        visa_simple(tmp_path / "nope")


def test_simple_empty_train(tmp_path):
    obj = tmp_path / "candle"
    (obj / "train/Normal").mkdir(parents=True)
    _img(obj / "test/Anomaly/x.png")
    with pytest.raises(DataLayoutError, match=r"train/Normal: no images"):
        visa_simple(obj)


def test_simple_missing_and_ambiguous_masks(tmp_path):
    obj = _simple(tmp_path / "cashew")
    (obj / "Masks/Anomaly/y.png").unlink()
    with pytest.raises(DataLayoutError, match=r"no mask for 1 anomaly image\(s\): y.JPG"):
        visa_simple(obj)
    _mask(obj / "Masks/Anomaly/y.png", 1)
    _mask(obj / "Masks/Anomaly/y.bmp", 1)
    with pytest.raises(DataLayoutError, match=r"several masks share a stem \(y: y.bmp, y.png\)"):
        visa_simple(obj)
