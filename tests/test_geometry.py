"""Resize protocols (stretch, keep-aspect, crop) and (H, W) input sizes: photo -> model input -> map over the photo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data.geometry import RESIZE_MODES, Placement, check_image_size, check_resize, input_shape, placement
from defectscope.data.images import preprocess
from defectscope.errors import DefectscopeError
from defectscope.report.heatmaps import resize_map

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PHOTO = (90, 150)  # (H, W): a wide photo
SIZES = (64, (48, 80), (80, 48))


# ------------------------------------------------------------------ placements
def test_placements_of_each_protocol():
    assert placement((300, 600), 224, "stretch") == Placement((224, 224), (0, 0), (224, 224))
    # keep-aspect: the longer side (relative to the input) fills it, the rest is padded evenly
    assert placement((300, 600), 256, "keep-aspect") == Placement((128, 256), (64, 0), (256, 256))
    assert placement((600, 300), (256, 320), "keep-aspect") == Placement((256, 128), (0, 96), (256, 320))
    # crop: 256 -> 224 as in the reference implementations; per side for (H, W)
    assert placement((300, 600), 224, "crop") == Placement((256, 256), (-16, -16), (224, 224))
    assert placement((300, 600), (256, 320), "crop") == Placement((293, 366), (-18, -23), (256, 320))
    assert placement((300, 600), 224, "crop").pad == (-16, -16, -16, -16)


def _marked_photo(y: int, x: int) -> np.ndarray:
    """A grey (H, W) photo with a bright 5 x 5 square centred on (y, x)."""
    photo = np.full((*PHOTO, 3), 100, np.uint8)
    photo[y - 2 : y + 3, x - 2 : x + 3] = 250
    return photo


def _centroid(values: np.ndarray) -> tuple[float, float]:
    """Centroid of the mark in a normalised channel: above 0.1 (the grey is -0.43, keep-aspect's pad 0)."""
    w = np.clip(values - 0.1, 0, None)
    ys, xs = np.mgrid[: values.shape[0], : values.shape[1]]
    return float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())


def _to_input(p: Placement, y: float, x: float) -> tuple[float, float]:
    """Photo pixel centre (y, x) -> model-input coordinates (pixel centres, as in align_corners=False)."""
    (h_r, w_r), (top, left) = p.resized, p.offset
    return (y + 0.5) * h_r / PHOTO[0] - 0.5 + top, (x + 0.5) * w_r / PHOTO[1] - 0.5 + left


@pytest.mark.parametrize("resize", RESIZE_MODES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mark", [(20, 30), (60, 110), (45, 75)])
def test_a_marked_photo_pixel_lands_where_expected_and_comes_back(resize, size, mark):
    p = placement(PHOTO, size, resize)
    x = preprocess(_marked_photo(*mark), size, MEAN, STD, resize)
    assert tuple(x.shape) == (3, *input_shape(size))
    got = _centroid(x[0].numpy())
    want = _to_input(p, *mark)
    assert got == pytest.approx(want, abs=0.75)
    # a map peaking at that input cell, taken back over the photo and laid on it, peaks on the mark
    amap = np.zeros(input_shape(size), np.float32)
    amap[int(round(got[0])), int(round(got[1]))] = 1.0
    over_photo = p.to_photo_frame(amap)
    assert over_photo.shape == p.resized
    back = np.unravel_index(np.argmax(resize_map(over_photo, PHOTO)), PHOTO)
    cell = max(PHOTO[0] / p.resized[0], PHOTO[1] / p.resized[1])
    assert abs(back[0] - mark[0]) <= cell + 1 and abs(back[1] - mark[1]) <= cell + 1


def test_keep_aspect_pads_with_the_input_mean_and_crop_cuts_the_border():
    photo = np.full((*PHOTO, 3), 200, np.uint8)
    x = preprocess(photo, 64, MEAN, STD, "keep-aspect")
    p = placement(PHOTO, 64, "keep-aspect")
    (top, _), (h_r, _) = p.offset, p.resized
    assert p.resized == (38, 64) and top == 13
    assert torch.all(x[:, :top] == 0) and torch.all(x[:, top + h_r :] == 0)  # 0 = the mean after normalisation
    assert torch.allclose(x[:, top : top + h_r], torch.full_like(x[:, top : top + h_r], (200 / 255 - 0.5) / 0.25))
    # crop: a frame one pixel wide around the photo is never seen
    framed = np.full((*PHOTO, 3), 100, np.uint8)
    framed[:4], framed[-4:], framed[:, :4], framed[:, -4:] = 255, 255, 255, 255
    x = preprocess(framed, 64, MEAN, STD, "crop")
    assert torch.allclose(x, torch.full_like(x, (100 / 255 - 0.5) / 0.25), atol=1e-5)


def test_maps_back_over_the_photo():
    amap = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + 5.0
    np.testing.assert_array_equal(placement(PHOTO, 64, "stretch").to_photo_frame(amap), amap)
    keep = placement(PHOTO, 64, "keep-aspect")
    np.testing.assert_array_equal(keep.to_photo_frame(amap), amap[13 : 13 + 38])
    crop = placement(PHOTO, 64, "crop")  # resized to 73 x 73, the centre 64 x 64 seen
    back = crop.to_photo_frame(amap)
    assert back.shape == (73, 73)
    np.testing.assert_array_equal(back[4 : 4 + 64, 4 : 4 + 64], amap)
    unseen = np.ones(back.shape, bool)
    unseen[4 : 4 + 64, 4 : 4 + 64] = False
    assert np.all(back[unseen] == amap.min())  # the border the crop cut away: the map's minimum
    batch = crop.to_photo_frame(np.stack([amap, amap + 1]))  # leading axes are kept, each map its own minimum
    assert batch.shape == (2, 73, 73) and batch[1, 0, 0] == amap.min() + 1
    with pytest.raises(DefectscopeError, match="model input"):
        crop.to_photo_frame(np.zeros((32, 32), np.float32))


@pytest.mark.parametrize("value", [0, 31, 2049, -5, True, 64.0, "64", [64], [64, 64, 64], [64, "abc"], [0, 64], None])
def test_bad_image_sizes_are_refused(value):
    with pytest.raises(DefectscopeError, match="image_size must be"):
        check_image_size(value)


def test_good_image_sizes_and_protocols():
    assert check_image_size(256) == (256, 256)
    assert check_image_size([256, 320]) == check_image_size((256, 320)) == (256, 320)
    assert check_image_size(np.int64(64)) == (64, 64)
    for mode in RESIZE_MODES:
        assert check_resize(mode) == mode
    with pytest.raises(DefectscopeError, match="resize must be one of stretch, keep-aspect, crop, got 'squash'"):
        check_resize("squash")


# ------------------------------------------------------------------ detectors
@pytest.mark.parametrize(
    "params, match",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": [256, "abc"]}, "image_size"),
        ({"image_size": (16, 64)}, "image_size"),
        ({"resize": "squash"}, "resize"),
    ],
)
def test_detector_validates_size_and_protocol(params, match):
    from defectscope.detectors import make_detector

    for method in ("patchcore", "padim", "spade"):
        with pytest.raises(DefectscopeError, match=match) as info:
            make_detector(method, **params)._validate_params()
        assert "\n" not in str(info.value)


def test_bench_suite_params_make_detectors():
    """benchmarks/bench_suite.py passes --params JSON straight to make_detector."""
    from defectscope.detectors import make_detector

    for text in ('{"resize": "crop", "image_size": 224}', '{"image_size": [256, 320]}'):
        for method in ("patchcore", "padim", "spade"):
            det = make_detector(method, **json.loads(text))
            if method != "padim":  # PaDiM's check also builds its backbone
                det._validate_params()
            json.dumps(det.get_params())
    assert make_detector("patchcore", **json.loads('{"image_size": [256, 320]}')).input_shape == (256, 320)


def _write_wide_category(root: Path, n_train: int = 10, n_good: int = 3, n_defect: int = 4) -> Path:
    """MVTec AD layout, 80 x 144 (H x W) texture photos; defects are spots off the centre (right, upper half)."""
    from synthetic import _texture

    rng = np.random.default_rng(3)
    folder = root / "wide"

    def photo() -> np.ndarray:
        return np.ascontiguousarray(_texture(rng, 144)[:80])

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(photo(), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(photo(), folder / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        image, mask = photo(), np.zeros((80, 144), np.uint8)
        cy, cx = 26 + 3 * i, 104 + 4 * i
        yy, xx = np.mgrid[:80, :144]
        spot = (yy - cy) ** 2 + (xx - cx) ** 2 <= 7**2
        image[spot] = (150, 45, 40)
        mask[spot] = 255
        save(image, folder / "test" / "spot" / f"{i:03d}.png")
        save(mask, folder / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return _write_wide_category(tmp_path_factory.mktemp("geometry"))


CASES = [("stretch", (48, 80)), ("keep-aspect", 96), ("crop", (48, 80))]


@pytest.fixture(scope="module")
def fitted(wide, tmp_path_factory):
    """{resize: (detector fitted on the wide set, model file, metadata)}."""
    from defectscope.data.layouts import mvtec_category
    from defectscope.detectors.patchcore import PatchCore
    from defectscope.fitting import fit_detector
    from defectscope.io import save_model

    split = mvtec_category(wide)
    out = {}
    for resize, size in CASES:
        det = PatchCore(image_size=size, resize=resize, coreset_ratio=0.25, blur_sigma=2.0)
        meta = fit_detector(det, split.train)
        path = save_model(tmp_path_factory.mktemp("models") / f"{resize}.dsmodel", det, meta)
        out[resize] = (det, path, meta)
    return split, out


@pytest.mark.parametrize("resize, size", CASES)
def test_fit_save_load_keeps_protocol_and_scores(fitted, resize, size):
    from defectscope.io import load_model, read_metadata
    from defectscope.scoring import score_paths

    split, models = fitted
    det, path, meta = models[resize]
    meta = read_metadata(path)
    assert meta["params"]["resize"] == meta["resize"] == resize
    assert meta["image_size"] == (list(size) if isinstance(size, tuple) else size)
    loaded, _ = load_model(path)
    assert loaded.resize == resize and loaded.input_shape == det.input_shape
    paths = [s.path for s in split.test]
    before = list(score_paths(det, paths, 1.0, keep_maps=True))
    after = list(score_paths(loaded, paths, 1.0, keep_maps=True))
    assert [r.score for r in before] == [r.score for r in after]
    shape = placement((80, 144), size, resize).resized
    for a, b in zip(before, after):
        assert a.map.shape == b.map.shape == shape
        np.testing.assert_array_equal(a.map, b.map)


@pytest.mark.parametrize("protocol", ["native", "mvtec"])
@pytest.mark.parametrize("resize, size", CASES)
def test_evaluation_finds_an_off_centre_defect_under_each_protocol(fitted, resize, size, protocol):
    from defectscope.data.images import load_mask
    from defectscope.evaluation.evaluate import evaluate_detector
    from defectscope.scoring import score_paths

    split, models = fitted
    det, _, meta = models[resize]
    result = evaluate_detector(det, split, meta["threshold"], protocol=protocol)
    assert result["resize"] == resize and not result["mask_errors"]
    assert result["image_auroc"] == 1.0
    assert result["pixel_auroc"] > 0.9
    # each defective photo's map, laid on the photo, peaks on its defect
    defective = [s for s in split.test if s.label == 1]
    for sample, res in zip(defective, score_paths(det, [s.path for s in defective], 1.0, keep_maps=True)):
        mask = load_mask(sample.mask_path)
        peak = np.unravel_index(np.argmax(resize_map(res.map, mask.shape)), mask.shape)
        ys, xs = np.nonzero(mask)
        assert np.hypot(peak[0] - ys.mean(), peak[1] - xs.mean()) <= 10, (resize, sample.path, peak)


def test_old_model_files_without_resize_load_as_stretch(fitted, tmp_path):
    from defectscope.io import load_model, read_model_file, write_model_file
    from defectscope.scoring import score_paths

    split, models = fitted
    det, path, _ = models["stretch"]
    tensors, meta = read_model_file(path)
    meta["params"].pop("resize")
    meta.pop("resize")
    old = tmp_path / "old.dsmodel"
    write_model_file(old, tensors, meta)
    loaded, meta = load_model(old)
    assert loaded.resize == "stretch" and "resize" not in meta["params"]
    paths = [s.path for s in split.test]
    assert [r.score for r in score_paths(loaded, paths, 1.0)] == [r.score for r in score_paths(det, paths, 1.0)]


def test_overlay_lies_on_the_photo_given(fitted):
    from defectscope.data.images import load_image
    from defectscope.report.heatmaps import overlay
    from defectscope.scoring import score_paths

    split, models = fitted
    det, _, meta = models["keep-aspect"]
    sample = next(s for s in split.test if s.label == 1)
    res = next(score_paths(det, [sample.path], meta["threshold"], keep_maps=True))
    image = load_image(sample.path)
    picture = overlay(image, res.map, meta["pixel_threshold"], legend=False)
    assert picture.shape == image.shape


# ------------------------------------------------------------------ command line
@pytest.mark.parametrize(
    "argv, text",
    [
        (["--image-size", "0"], "out of range"),
        (["--image-size", "256,abc"], "'abc' is not a whole number"),
        (["--image-size", "256,320,3"], "not an image size"),
        (["--image-size", "16,256"], "out of range"),
        (["--resize", "squash"], "invalid choice: 'squash'"),
    ],
)
def test_cli_refuses_bad_sizes_and_protocols_while_parsing(argv, text, capsys):
    from defectscope.cli.commands import main

    for command in (["fit", "D", "-o", "m"], ["tune", "D"], ["benchmark", "D"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, *argv])
        err = capsys.readouterr()[1]
        assert stop.value.code == 2
        assert len(err.strip().splitlines()) == 1 and text in err


def test_cli_fit_with_keep_aspect_and_height_width(wide, tmp_path, capsys):
    from defectscope.cli.commands import main
    from defectscope.io import read_metadata

    model = tmp_path / "m.dsmodel"
    code = main(
        [
            "fit",
            str(wide),
            "-o",
            str(model),
            "--image-size",
            "48,80",
            "--resize",
            "keep-aspect",
            "--coreset-ratio",
            "0.25",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr()[1]
    meta = read_metadata(model)
    assert meta["image_size"] == [48, 80] and meta["params"]["resize"] == "keep-aspect"
    capsys.readouterr()
    code = main(
        ["predict", str(model), str(wide / "test" / "spot"), "--heatmaps", str(tmp_path / "h"), "--no-progress"]
    )
    assert code == 0
    assert len(list((tmp_path / "h").glob("*.png"))) == 4
