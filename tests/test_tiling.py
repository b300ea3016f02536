"""Tiling (PatchCore --tile N --tile-overlap R): the grid against brute force, scores and maps against
a plain model scoring the tiles one by one, held-out scores in the image's fold, and the front ends."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from defectscope.components.tiling import tile_grid
from defectscope.data.images import load_image, preprocess
from defectscope.data.layouts import mvtec_category
from defectscope.detectors.patchcore import PatchCore
from defectscope.errors import DefectscopeError

SIZE = 64  # each tile; the canvas of 2 x 2 tiles at overlap 0.25 is 64 + 48 = 112


@pytest.mark.parametrize(
    "tile,n,overlap",
    [((64, 64), 2, 0.25), ((64, 96), 3, 0.5), ((50, 50), 2, 0.0), ((33, 40), 4, 0.9), ((64, 64), 1, 0.25)],
)
def test_grid_covers_the_canvas_and_stitches_back(tile, n, overlap):
    grid = tile_grid(tile, n, overlap)
    h, w = grid.canvas
    assert grid.count == n * n and len(grid.origins()) == n * n
    cover = np.zeros((h, w), int)
    for y, x in grid.origins():  # brute force: every tile inside the canvas, every pixel covered
        assert 0 <= y <= h - tile[0] and 0 <= x <= w - tile[1]
        cover[y : y + tile[0], x : x + tile[1]] += 1
    assert cover.min() >= 1
    assert (h, w) == (tile[0] + (n - 1) * grid.stride[0], tile[1] + (n - 1) * grid.stride[1])
    canvas = torch.rand(3, 2, h, w)
    tiles = grid.split(canvas)
    assert tiles.shape == (3 * n * n, 2, *tile)
    for b, (t, (y, x)) in itertools.product(range(3), enumerate(grid.origins())):
        assert torch.equal(tiles[b * n * n + t], canvas[b, :, y : y + tile[0], x : x + tile[1]])
    # stitching the tiles of one map gives the map back; overlaps are averaged
    assert torch.allclose(grid.stitch(tiles[:, 0]), canvas[:, 0], atol=1e-6)
    ones = torch.arange(3 * n * n, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, *tile)
    stitched = grid.stitch(ones)
    expected = np.zeros((3, h, w))
    for b, (t, (y, x)) in itertools.product(range(3), enumerate(grid.origins())):
        expected[b, y : y + tile[0], x : x + tile[1]] += b * n * n + t
    assert np.allclose(stitched.numpy(), expected / cover)


@pytest.mark.parametrize(
    "n,overlap", [(0, 0.25), (9, 0.25), (2.0, 0.25), (True, 0.25), (2, -0.1), (2, 0.95), (2, "0.2")]
)
def test_bad_grids_are_refused(n, overlap):
    with pytest.raises(DefectscopeError, match="tiles|tile_overlap"):
        tile_grid((64, 64), n, overlap)


def test_grid_refuses_wrong_sizes():
    grid = tile_grid((64, 64), 2, 0.25)
    with pytest.raises(DefectscopeError, match="112x112"):
        grid.split(torch.zeros(1, 3, 64, 64))
    with pytest.raises(DefectscopeError, match="stitch"):
        grid.stitch(torch.zeros(3, 64, 64))


def test_detector_checks_its_tiling():
    with pytest.raises(DefectscopeError, match="tiles"):
        PatchCore(tiles=0).fit(torch.zeros(2, 3, 64, 64))
    with pytest.raises(
        DefectscopeError,
        match="8 x 8 tiles of 512x512 overlapping by 0.0 make a 4096x4096 canvas, over the 2048 px limit",
    ):
        PatchCore(image_size=512, tiles=8, tile_overlap=0.0).fit(torch.zeros(2, 3, 64, 64))
    det = PatchCore(image_size=32, tiles=np.int64(2), tile_overlap=np.float32(0.5), rotations=np.int32(2))
    det.fit(torch.rand(2, 3, 48, 48))  # numpy numbers are numbers; stored as Python ones (the model file is JSON)
    assert type(det.tiles) is int and type(det.tile_overlap) is float and type(det.rotations) is int


def _canvases(paths, det):
    mean, std = det.input_stats
    return torch.stack([preprocess(load_image(p), det.input_shape, mean, std) for p in paths])


def _plain(det, bank):
    """A plain (untiled) PatchCore with det's extractor and parameters whose memory bank is ``bank``."""
    ref = PatchCore(image_size=SIZE, num_neighbors=det.num_neighbors, blur_sigma=det.blur_sigma)
    ref.set_extractor(det.extractor)
    ref.load_state(
        {
            "memory_bank": bank,
            "bank_image": torch.zeros(len(bank), dtype=torch.int64),
            "grid": torch.tensor(det.grid_),
            "n_train": torch.tensor(det.n_train_),
            "training_scores": det.training_scores_,
        }
    )
    return ref


@pytest.fixture(scope="module")
def tiled(synthetic_category):
    split = mvtec_category(synthetic_category)
    det = PatchCore(image_size=SIZE, coreset_ratio=0.2, seed=0, tiles=2, tile_overlap=0.25, folds=3, blur_sigma=0)
    assert det.input_shape == (112, 112)
    train = _canvases(split.train[:12], det)
    det.fit(train)
    return det, split, train


def test_tiled_scores_and_maps_are_the_tiles_scored_alone(tiled):
    """Image score = the largest of the plain model's scores of the image's tiles; map = the tiles' maps
    stitched onto the canvas (blur 0, so nothing else enters)."""
    det, split, _ = tiled
    test = _canvases([s.path for s in split.test[:6]], det)
    pred = det.predict(test)
    assert pred.maps.shape == (6, 112, 112)
    plain = _plain(det, det.memory_bank_)
    tiles = det.tile_grid.split(test)
    alone = plain.predict(tiles)
    assert np.allclose(pred.scores, alone.scores.reshape(6, 4).max(axis=1), rtol=1e-5)
    stitched = det.tile_grid.stitch(torch.from_numpy(alone.maps)).numpy()
    assert np.allclose(pred.maps, stitched, rtol=1e-5, atol=1e-6)


def test_tiles_stay_in_their_image_fold(tiled):
    """Every tile of a training image belongs to it: n_patches counts them all, bank_image_ names the
    image, and a held-out score is the largest tile score against the bank without the image's fold."""
    det, _, train = tiled
    n_grid = det.grid_[0] * det.grid_[1]
    assert det.fit_details_["n_patches"] == 12 * 4 * n_grid and det.fit_details_["tiles"] == 4
    assert int(det.bank_image_.max()) < 12
    folds = det._image_folds(12)
    for i in (0, 5, 11):
        without = _plain(det, det.memory_bank_[folds[det.bank_image_] != folds[i]])
        tiles = det.tile_grid.split(train[i : i + 1])
        expected = float(without.predict(tiles).scores.max())
        assert det.training_scores()[i] == pytest.approx(expected, rel=1e-4)


def test_tiling_through_the_api_saves_loads_and_maps_over_the_photo(synthetic_category, tmp_path):
    import defectscope

    model = defectscope.fit(synthetic_category, method="patchcore", image_size=SIZE, tiles=2, coreset_ratio=0.2)
    path = tmp_path / "tiled.dsmodel"
    model.save(path)
    again = defectscope.load(path)
    assert again.detector.tiles == 2 and again.detector.input_shape == (112, 112)
    photo = mvtec_category(synthetic_category).test[-1].path
    first, second = model.predict(photo), again.predict(photo)
    assert first.score == pytest.approx(second.score, rel=1e-6)
    assert first.anomaly_map.shape == load_image(photo).shape[:2]


def test_tiled_models_are_not_exported(synthetic_category, tmp_path):
    pytest.importorskip("onnx")
    import defectscope
    from defectscope.export.exporter import export_model

    model = defectscope.fit(synthetic_category, method="patchcore", image_size=SIZE, tiles=2, coreset_ratio=0.2)
    model.save(tmp_path / "tiled.dsmodel")
    with pytest.raises(DefectscopeError, match="--tile"):
        export_model(tmp_path / "tiled.dsmodel", tmp_path / "out", "onnx")


def test_tile_options_on_the_command_line(synthetic_category, tmp_path, capsys):
    import json

    from defectscope.cli.commands import main
    from defectscope.io import read_metadata

    out = tmp_path / "tiled.dsmodel"
    assert (
        main(
            [
                "fit",
                str(synthetic_category),
                "-o",
                str(out),
                "--image-size",
                "64",
                "--tile",
                "2",
                "--tile-overlap",
                "0.5",
                "--coreset-ratio",
                "0.2",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = read_metadata(out)
    assert meta["params"]["tiles"] == 2 and meta["params"]["tile_overlap"] == 0.5
    assert meta["training"]["details"]["tiles"] == 4
    capsys.readouterr()
    photo = mvtec_category(synthetic_category).test[-1].path
    assert main(["predict", str(out), str(photo), "--json"]) in (0, 1)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["score"] > 0
    for bad in (["--tile", "9"], ["--tile-overlap", "0.95"], ["--tile", "two"]):
        with pytest.raises(SystemExit):
            main(["fit", str(synthetic_category), "-o", str(tmp_path / "x.dsmodel"), *bad])
        assert "--tile" in capsys.readouterr().err


def test_tiny_photos_are_named_against_the_canvas_and_never_all_excluded(synthetic_category, tmp_path, caplog):
    import logging
    import shutil

    import defectscope

    small = tmp_path / "small"
    small.mkdir()
    for path in sorted((synthetic_category / "train" / "good").glob("*.png"))[:4]:
        shutil.copy(path, small)
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        model = defectscope.fit(
            small, method="patchcore", image_size=96, tiles=8, tile_overlap=0.0, exclude_outliers=True
        )
    suspects = model.meta["training"]["suspects"]
    assert (
        len(suspects) == 4
        and "far smaller than the 768x768 (8 x 8 tiles of 96x96) model input" in suspects[0]["reason"]
    )
    assert model.meta["training"]["n_images"] == 4 and "none excluded" in caplog.text
    assert model.meta["training"]["exclusion_declined"] is True


def test_options_of_another_method_are_named_by_their_flags(synthetic_category, tmp_path, capsys):
    from defectscope.cli.commands import main

    for option in (
        ["--tile", "2"],
        ["--tile-overlap", "0.5"],
        ["--border-padding", "exclude"],
        ["--layer-weighting", "equal"],
    ):
        assert (
            main(["fit", str(synthetic_category), "-o", str(tmp_path / "p.dsmodel"), "--method", "padim", *option]) == 2
        )
        assert f"{option[0]} is a patchcore option; --method padim does not take it" in capsys.readouterr().err
    assert (
        main(
            [
                "benchmark",
                str(synthetic_category),
                "--methods",
                "padim",
                "spade",
                "--tile",
                "2",
                "-o",
                str(tmp_path / "bench"),
            ]
        )
        == 2
    )
    assert "--tile is a patchcore option; --methods padim spade do not take it" in capsys.readouterr().err
