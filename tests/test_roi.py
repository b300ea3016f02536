"""Regions of interest: a defect outside the region is ignored and one inside is caught, at every front end
(the API, the command line, an ONNX export); the region against brute-force references; the model file
round trip; bad regions refused before the fit's work; models without a region unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from synthetic import _texture
from tiny import SIZE as TINY
from tiny import TinyExtractor, textures

import defectscope
from defectscope.cli.commands import main
from defectscope.components.roi import auto_roi, polygon_roi, resolve_roi, to_model_input
from defectscope.data.geometry import placement
from defectscope.data.images import preprocess
from defectscope.detectors.padim import PaDiM
from defectscope.detectors.patchcore import PatchCore
from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.io import read_model_file, write_model_file
from defectscope.report.heatmaps import DIM, overlay

SIZE = 128
#: the region: the left 56 of 128 pixels; defects are drawn at x = 28 (inside) and x = 104 (outside)
EDGE = 56
METHODS = {"patchcore": {"coreset_ratio": 0.25}, "padim": {}}


def _spot(image: np.ndarray, cx: int, cy: int = SIZE // 2, r: int = 8) -> np.ndarray:
    """A reddish blob (the synthetic category's ``spot`` defect) drawn at (cx, cy)."""
    canvas = Image.fromarray(image.copy())
    ImageDraw.Draw(canvas).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(150, 45, 40))
    return np.asarray(canvas).copy()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Good texture photos to fit on; test triples (good, a spot outside the region, the spot inside); the
    region as polygons (photo pixels) and as a mask image drawn at twice the photos' size."""
    root = tmp_path_factory.mktemp("roi")
    rng = np.random.default_rng(0)
    (root / "train").mkdir()
    for i in range(16):
        Image.fromarray(_texture(rng, SIZE)).save(root / "train" / f"{i:03d}.png")
    triples = []
    for i in range(3):
        good = _texture(rng, SIZE)
        names = []
        for kind, image in (("good", good), ("outside", _spot(good, 104)), ("inside", _spot(good, 28))):
            path = root / "test" / f"{kind}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(image).save(path)
            names.append(path)
        triples.append(names)
    polygons = root / "region.json"
    polygons.write_text(
        json.dumps({"image_size": [SIZE, SIZE], "polygons": [[[0, 0], [EDGE, 0], [EDGE, SIZE], [0, SIZE]]]})
    )
    mask = np.zeros((2 * SIZE, 2 * SIZE), np.uint8)
    mask[:, : 2 * EDGE] = 255
    Image.fromarray(mask).save(root / "region.png")
    return {
        "root": root,
        "train": root / "train",
        "triples": triples,
        "polygons": polygons,
        "mask": root / "region.png",
    }


@pytest.fixture(scope="module")
def models(data, tmp_path_factory) -> dict:
    """PatchCore and PaDiM fitted with the polygon region through the API, saved: {method: (model, path)}."""
    root = tmp_path_factory.mktemp("roi-models")
    out = {}
    for method, params in METHODS.items():
        model = defectscope.fit(data["train"], method=method, image_size=SIZE, roi=data["polygons"], **params)
        out[method] = (model, model.save(root / f"{method}.dsmodel"))
    return out


def _region() -> np.ndarray:
    region = np.zeros((SIZE, SIZE), bool)
    region[:, :EDGE] = True
    return region


def assert_judged_by_the_region(results: list) -> None:
    """(good, outside, inside) results: the outside defect leaves the verdict good and moves the score by less
    than a tenth of what the same defect inside does; the inside one is judged defective."""
    good, outside, inside = results
    assert all(r.ok for r in results), [r.error for r in results]
    assert (good.judgement, outside.judgement, inside.judgement) == (0, 0, 1), [r.score for r in results]
    assert abs(outside.score - good.score) < 0.1 * (inside.score - good.score), [r.score for r in results]


# --------------------------------------------------------------------------- the front ends
@pytest.mark.parametrize("method", list(METHODS))
def test_a_defect_outside_the_region_is_ignored_and_one_inside_is_caught(models, data, method):
    model = defectscope.load(models[method][1])
    assert model.info()["roi"] == "polygons" and model.meta["roi"]["share"] == pytest.approx(EDGE / SIZE, abs=0.01)
    for triple in data["triples"]:
        results = model.predict(triple)
        assert_judged_by_the_region(results)
        for result in results:  # maps keep their shape, 0 outside; the region comes back over the photo
            assert result.anomaly_map.shape == (SIZE, SIZE)
            assert np.array_equal(result.roi, _region())
            assert float(np.abs(result.anomaly_map[:, EDGE + 2 :]).max()) == 0.0
            assert float(result.anomaly_map[:, : EDGE - 2].min()) > 0.0
    # the same model judging the whole image catches the outside defect: the region is what ignored it
    model.detector.set_roi(None)
    whole = model.predict(data["triples"][0])
    assert whole[1].judgement == 1 and whole[1].score > 2 * whole[0].score


def test_the_overlay_dims_what_is_not_judged(models, data):
    model = defectscope.load(models["patchcore"][1])
    result = model.predict(data["triples"][0][2])
    picture = result.overlay(legend=False)
    photo = np.asarray(Image.open(data["triples"][0][2]).convert("RGB"))
    assert picture.shape == photo.shape
    far = np.s_[4:-4, EDGE + 6 : -4]  # outside, away from the region's grey border
    assert np.array_equal(picture[far], (photo[far].astype(np.float32) * DIM).astype(np.uint8))
    assert not np.array_equal(picture[:, : EDGE - 4], photo[:, : EDGE - 4])  # inside: the map's colours
    plain = overlay(photo, result._map, model.pixel_threshold, legend=False)  # no region given: nothing dimmed
    assert not np.array_equal(plain[far], picture[far])


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_fit_with_a_mask_then_predict(data, tmp_path, capsys, method):
    path = tmp_path / "cli.dsmodel"
    argv = ["fit", str(data["train"]), "-o", str(path), "--method", method, "--image-size", str(SIZE)]
    argv += ["--coreset-ratio", "0.25"] if method == "patchcore" else []
    assert main([*argv, "--roi", str(data["mask"]), "--no-progress"]) == 0
    said = capsys.readouterr()
    assert f"--roi mask: judging 44% of the model input ({data['mask']})" in said.err
    model = defectscope.load(path)
    assert model.meta["roi"]["source_size"] == [2 * SIZE, 2 * SIZE]
    assert np.array_equal(model.detector.roi_mask(), _region())  # a mask of twice the size maps onto the same region
    for triple in data["triples"]:
        assert main(["predict", str(path), *map(str, triple), "--json", "--no-progress"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [row["judgement"] for row in rows] == [0, 0, 1]
        assert [row["score"] for row in rows] == [r.score for r in model.predict(triple, maps=False)]


@pytest.mark.parametrize("method", list(METHODS))
def test_an_onnx_export_judges_as_its_model_file(models, data, tmp_path, method):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from defectscope.export.exporter import MAP_TOL, SCORE_RTOL, export_model

    folder = tmp_path / f"{method}-onnx"
    meta = export_model(models[method][1], folder, "onnx")
    assert meta["export"]["agreement"]["within"] and (folder / "roi.png").is_file()
    exported = defectscope.load(folder)
    assert exported.runtime == "onnxruntime" and np.array_equal(exported.detector.roi_mask(), _region())
    source = defectscope.load(models[method][1])
    for triple in data["triples"]:
        ours, theirs = exported.predict(triple), source.predict(triple)
        assert_judged_by_the_region(ours)
        for a, b in zip(theirs, ours):
            assert b.score == pytest.approx(a.score, rel=SCORE_RTOL)
            spread = float(np.ptp(a.anomaly_map))
            assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) <= MAP_TOL * spread
            assert float(np.abs(b.anomaly_map[:, EDGE + 2 :]).max()) == 0.0
    assert np.array_equal(exported.predict(data["triples"][0][0]).roi, _region())


def test_evaluate_and_batch_judge_by_the_region(models, data, tmp_path):
    from defectscope.batch import run_batch
    from defectscope.batch.sinks import read_output

    model_path = models["patchcore"][1]
    paths = [str(p) for triple in data["triples"] for p in triple]
    out = tmp_path / "rows.csv"
    run_batch(model_path, paths, out, runtime="torch")
    rows = {r["path"]: r for r in read_output(out)}
    assert [rows[p]["judgement"] for p in paths] == [0, 0, 1] * 3
    # evaluate: defective images whose spot lies outside the region are not caught, those inside are
    from defectscope.data.samples import Sample, Split

    test = [Sample(t[0], 0, "good") for t in data["triples"]]
    test += [Sample(t[1], 1, "outside") for t in data["triples"]] + [Sample(t[2], 1, "inside") for t in data["triples"]]
    result = defectscope.load(model_path).evaluate(Split("region", [], test), heatmap_dir=tmp_path / "maps")
    caught = {r["defect_type"]: [] for r in result["images"]}
    for r in result["images"]:
        caught[r["defect_type"]].append(r["judgement"])
    assert caught == {"good": [0, 0, 0], "outside": [0, 0, 0], "inside": [1, 1, 1]}
    assert len(list((tmp_path / "maps").rglob("*.png"))) == 9


# --------------------------------------------------------------------------- the model file
def test_the_region_round_trips_through_the_model_file_under_its_checksum(models, data, tmp_path):
    model, path = models["padim"]
    tensors, meta = read_model_file(path)
    assert tensors["roi.mask"].dtype == torch.uint8 and np.array_equal(tensors["roi.mask"].numpy() == 1, _region())
    assert meta["roi"]["kind"] == "polygons" and meta["roi"]["source"] == str(data["polygons"])
    again = defectscope.load(path)
    assert torch.equal(again.detector.roi_, model.detector.roi_)
    images = data["triples"][1]
    assert [r.score for r in again.predict(images)] == [r.score for r in model.predict(images)]
    edited = dict(tensors)
    edited["roi.mask"] = torch.ones_like(tensors["roi.mask"])  # judge everything, keep the old checksum
    from safetensors.torch import save_file

    save_file(edited, str(tmp_path / "edited.dsmodel"), metadata={"defectscope": json.dumps(meta, sort_keys=True)})
    with pytest.raises(ModelFileError, match="damaged or was edited"):
        defectscope.load(tmp_path / "edited.dsmodel")


@pytest.mark.parametrize("method", list(METHODS))
def test_models_without_a_region_load_and_score_as_before(models, data, tmp_path, method):
    """A file without ``roi.mask`` and ``roi`` (every file written before regions existed) loads without one
    and scores bit-identically to the same detector with the region taken away."""
    tensors, meta = read_model_file(models[method][1])
    del tensors["roi.mask"], meta["roi"]
    old = tmp_path / "old.dsmodel"
    write_model_file(old, tensors, meta)
    loaded = defectscope.load(old)
    assert loaded.detector.roi_ is None and loaded.info()["roi"] == "none"
    reference = defectscope.load(models[method][1])
    reference.detector.set_roi(None)
    images = [p for triple in data["triples"] for p in triple]
    ours, theirs = loaded.predict(images), reference.predict(images)
    assert [r.score for r in ours] == [r.score for r in theirs]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) and a.roi is None for a, b in zip(ours, theirs))
    assert "roi.mask" not in read_model_file(loaded.save(tmp_path / "again.dsmodel"))[0]


@pytest.mark.parametrize("cls", [PatchCore, PaDiM])
def test_a_region_covering_everything_changes_nothing(cls):
    """The whole input as the region: scores, maps, held-out training scores and map maxima bit-identical."""
    train, test = textures(20, seed=1), textures(4, seed=2)
    plain, whole = _tiny(cls), _tiny(cls)
    whole.set_roi(np.ones((TINY, TINY), bool))
    plain.fit(train)
    whole.fit(train)
    a, b = plain.predict(test), whole.predict(test)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    assert np.array_equal(plain.training_scores(), whole.training_scores())
    assert np.array_equal(plain.training_map_maxima(), whole.training_map_maxima())


# --------------------------------------------------------------------------- references
def _tiny(cls: type, **params):
    extra = {"coreset_ratio": 0.5} if cls is PatchCore else {"d_reduced": 16, "epsilon": 0.01}
    det = cls(image_size=TINY, **{**extra, **params})
    det.set_extractor(TinyExtractor())
    return det


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def test_patchcore_scores_the_most_anomalous_patch_inside_against_brute_force():
    from test_patchcore import _reweighted_reference

    region = _disc((TINY, TINY), 30.5, 22.0, 17.0)  # not aligned to the 4 px cells
    det = _tiny(PatchCore)
    det.set_roi(region)
    train, test = textures(20, seed=1), textures(4, seed=2)
    det.fit(train)
    h, w = det.grid_
    inside = det.roi_patches(det.grid_)[0].numpy().reshape(h, w)
    cell = TINY // h
    shares = region.reshape(h, cell, w, cell).mean(axis=(1, 3))  # brute force: the region's share of each cell
    assert np.array_equal(inside, shares >= 0.5) and 0 < inside.sum() < inside.size
    pred = det.predict(test)
    bank = det.memory_bank_.double().numpy()
    with torch.inference_mode():
        feats = det._patch_features(test)
    for i in range(len(test)):
        patches = feats[i].reshape(-1, feats.shape[-1]).double().numpy()
        assert pred.scores[i] == pytest.approx(_reweighted_reference(bank, patches[inside.ravel()], 9), rel=1e-4)
        assert not pred.maps[i][~region].any() and pred.maps[i][region].min() > 0
    # the held-out scores that set the threshold use the region too: image i against the other folds' entries
    folds = det._image_folds(len(train))
    for i in (0, 7, 13):
        keep = folds[det.bank_image_] != folds[i]
        ref = _tiny(PatchCore)
        ref.load_state(
            {
                "memory_bank": det.memory_bank_[keep],
                "bank_image": torch.zeros(int(keep.sum()), dtype=torch.int64),
                "grid": torch.tensor(det.grid_),
                "n_train": torch.tensor(det.n_train_),
                "training_scores": det.training_scores_,
            }
        )
        ref.set_roi(region)
        held = ref.predict(train[i : i + 1])
        assert det.training_scores()[i] == pytest.approx(float(held.scores[0]), rel=1e-5)
        assert det.training_map_maxima()[i] == pytest.approx(float(held.maps[0].max()), rel=1e-5)


def test_the_region_leaves_the_memory_bank_alone():
    """Fitting with a region gives the bank fitting without one gives: the region only changes what is scored."""
    train = textures(20, seed=1)
    plain, roi = _tiny(PatchCore), _tiny(PatchCore)
    roi.set_roi(_disc((TINY, TINY), 32, 32, 20))
    plain.fit(train)
    roi.fit(train)
    assert torch.equal(plain.memory_bank_, roi.memory_bank_) and torch.equal(plain.bank_image_, roi.bank_image_)
    assert not torch.equal(plain.training_scores_, roi.training_scores_)


def test_padim_scores_the_maximum_of_its_map_inside():
    region = _disc((TINY, TINY), 20.0, 40.0, 15.0)
    plain, det = _tiny(PaDiM), _tiny(PaDiM)
    det.set_roi(region)
    train, test = textures(20, seed=1), textures(4, seed=2)
    plain.fit(train)
    det.fit(train)
    a, b = plain.predict(test), det.predict(test)
    assert np.array_equal(b.maps, np.where(region, a.maps, 0.0))
    assert np.array_equal(b.scores, a.maps[:, region].max(axis=1))
    assert (b.scores < a.scores).any()
    assert np.array_equal(det.training_scores(), det.training_map_maxima())


def test_tiles_outside_the_region_score_zero_and_the_image_scores_its_worst_tile_inside():
    det = _tiny(PatchCore, tiles=2, tile_overlap=0.0)  # a 128 px canvas of four 64 px tiles
    region = np.zeros(det.input_shape, bool)
    region[:64, :64] = True  # the top-left tile only
    det.set_roi(region)
    canvas = torch.nn.functional.interpolate(textures(12, seed=1), size=det.input_shape, mode="bilinear")
    det.fit(canvas)
    test = torch.nn.functional.interpolate(textures(2, seed=2), size=det.input_shape, mode="bilinear")
    test[:, :, 80:110, 80:110] = 3.0  # a bright square in the bottom-right tile: outside
    pred = det.predict(test)
    top_left = _tiny(PatchCore)
    top_left.load_state({k: v for k, v in det.state_dict().items() if k != "roi.mask"})
    assert pred.scores == pytest.approx(top_left.predict(test[:, :, :64, :64]).scores, rel=1e-5)
    assert not pred.maps[:, 64:].any() and not pred.maps[:, :, 64:].any()


# --------------------------------------------------------------------------- reading regions
def test_a_photo_mask_maps_onto_the_input_as_the_photo_does():
    rng = np.random.default_rng(3)
    mask = _disc((150, 230), 60.0, 140.0, 50.0) | (rng.random((150, 230)) > 0.97)
    rgb = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    for size, resize in ((64, "stretch"), ((48, 80), "stretch"), (64, "keep-aspect"), (64, "crop")):
        ours = to_model_input(mask, size, resize)
        photo = preprocess(rgb, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize)[0].numpy()  # the photo's own mapping
        assert np.array_equal(ours, photo >= 0.5), (size, resize)
    keep = to_model_input(np.ones((100, 200), bool), 64, "keep-aspect")  # the padding is outside
    place = placement((100, 200), 64, "keep-aspect")
    assert keep.sum() == place.resized[0] * place.resized[1] and not keep[: place.offset[0]].any()


def test_polygons_are_drawn_in_photo_pixels(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "image_size": [200, 100],
                "polygons": [[[0, 0], [100, 0], [100, 100], [0, 100]], [[150, 40], [190, 40], [170, 90]]],
            }
        )
    )
    photo, record = polygon_roi(path)
    assert photo.shape == (100, 200) and record == {
        "kind": "polygons",
        "source": str(path),
        "source_size": [200, 100],
        "n_polygons": 2,
    }
    assert photo[:, :100].all() and not photo[:, 101:140].any() and photo[60, 170] and not photo[10, 170]
    region, stored = resolve_roi(path, 64)
    assert np.array_equal(region, to_model_input(photo, 64)) and stored["share"] == pytest.approx(
        region.mean(), abs=1e-4
    )


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_bad_regions_are_refused_before_the_fit(data, tmp_path, monkeypatch):
    import defectscope.fitting

    def never(*args, **kwargs):
        raise AssertionError("the fit started")

    monkeypatch.setattr(defectscope.fitting, "fit_detector", never)
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(black)
    dot = tmp_path / "dot.png"
    Image.fromarray(np.pad(np.full((1, 1), 255, np.uint8), ((300, 299), (300, 299)))).save(dot)
    cases = {
        tmp_path / "missing.png": "missing.png: file not found",
        _write(tmp_path / "empty.png", b""): r"empty.png: file is empty \(0 bytes\)",
        _write(tmp_path / "text.png", "not a picture"): "text.png: not an image file",
        black: "black.png: the mask has no white pixel",
        dot: "dot.png: the region .* covers no pixel of the 128x128 model input",
        tmp_path / "missing.json": "missing.json: file not found",
        _write(tmp_path / "blank.json", "  \n"): "blank.json: the file is empty",
        _write(tmp_path / "broken.json", '{"polygons": [[[0, 0]'): r"broken.json: not valid JSON \(line 1, column",
        _write(tmp_path / "list.json", "[]"): "list.json: expected a JSON object",
        _write(
            tmp_path / "typo.json", '{"image_size": [9, 9], "polygon": []}'
        ): "unknown key.*'polygon'.*missing 'polygons'",
        _write(tmp_path / "size.json", '{"image_size": [9], "polygons": [[[0,0],[1,0],[0,1]]]}'): "image_size must be",
        _write(tmp_path / "none.json", '{"image_size": [9, 9], "polygons": []}'): "polygons must be a non-empty list",
        _write(tmp_path / "huge.json", '{"image_size": [90000, 90000], "polygons": [[[0,0],[1,0],[0,1]]]}'): "over 50 "
        "megapixels",
        _write(
            tmp_path / "two.json", '{"image_size": [9, 9], "polygons": [[[0, 0], [5, 5]]]}'
        ): "polygon 0 must be a list of at least 3",
        _write(
            tmp_path / "word.json", '{"image_size": [9, 9], "polygons": [[[0, 0], [5, "a"], [1, 3]]]}'
        ): "polygon 0, point 1: expected",
        _write(
            tmp_path / "far.json", '{"image_size": [9, 9], "polygons": [[[0, 0], [5, 12], [1, 3]]]}'
        ): r"point 1 \(5, 12\) lies outside the 9x9 photo",
        _write(
            tmp_path / "line.json", '{"image_size": [9, 9], "polygons": [[[0, 0], [2, 2], [4, 4]]]}'
        ): "polygon 0 has no area",
    }
    for spec, message in cases.items():
        with pytest.raises(DefectscopeError, match=message):
            defectscope.fit(data["train"], image_size=SIZE, roi=spec)
    with pytest.raises(DefectscopeError, match="SPADE's image score .* use --method patchcore or padim"):
        defectscope.fit(data["train"], method="spade", image_size=SIZE, roi=data["mask"])
    with pytest.raises(DefectscopeError, match="roi must be a file path or 'auto'"):
        defectscope.fit(data["train"], image_size=SIZE, roi=3)
    assert main(["fit", str(data["train"]), "-o", str(tmp_path / "m.dsmodel"), "--roi", str(black)]) == 2


def _discs(folder: Path, n: int = 12) -> list[Path]:
    """Light discs (a dark print inside) on a dark background, wandering right by 4 px per image."""
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        photo = np.full((200, 200, 3), 20, np.uint8) + rng.integers(0, 6, (200, 200, 3), dtype=np.uint8)
        cx = 80 + 4 * i
        photo[_disc((200, 200), 100, cx, 40)] = (220, 210, 200)
        photo[_disc((200, 200), 100, cx, 8)] = (30, 30, 30)  # a dark print inside the part: a hole to fill
        Image.fromarray(photo).save(folder / f"{i:02d}.png")
        files.append(folder / f"{i:02d}.png")
    return files


def test_fit_roi_auto_on_the_command_line_and_its_fallback(data, tmp_path, capsys, caplog):
    files = _discs(tmp_path / "discs")
    path = tmp_path / "auto.dsmodel"
    assert main(["fit", str(tmp_path / "discs"), "-o", str(path), "--image-size", "64", "--roi", "auto"]) == 0
    assert "--roi auto: judging" in capsys.readouterr().err
    model = defectscope.load(path)
    region, record = auto_roi(files, 64)
    assert np.array_equal(model.detector.roi_mask(), region) and model.meta["roi"] == {
        **record,
        "share": round(float(region.mean()), 4),
        "input_size": [64, 64],
        "outside": "left out of the image score and the thresholds; anomaly map 0",
    }
    # textures filling the frame: no part, so the whole image is judged, with a warning that says so
    plain = defectscope.fit(data["train"], image_size=64, coreset_ratio=0.25, roi="auto")
    assert plain.detector.roi_ is None and plain.info()["roi"] == "none" and plain.meta["roi"]["applied"] is False
    assert "the whole image is judged" in caplog.text


def test_auto_finds_the_part_over_the_training_photos(tmp_path):
    """Light discs on a dark background at shifting places: the region is their union widened by the margin,
    the far corners stay outside; a texture filling the frame gives no region, and says why."""
    files = _discs(tmp_path)
    region, record = auto_roi(files, 100)
    assert record["applied"] and record["n_found"] == record["n_images"] == 12 and record["margin_px"] == 3
    union = np.zeros((100, 100), bool)
    for i in range(12):
        union |= _disc((100, 100), 49.75, (80 + 4 * i) / 2 - 0.25, 20)
    assert region[union].all()  # the whole part, print included, in every image
    near = np.zeros((100, 100), bool)  # the union widened by the 3 px margin and a pixel of resizing
    for i in range(12):
        near |= _disc((100, 100), 49.75, (80 + 4 * i) / 2 - 0.25, 24.5)
    assert not region[~near].any()
    assert not region[:10].any() and not region[:, :10].any() and not region[-10:].any()
    frames = []
    for i in range(4):
        Image.fromarray(_texture(np.random.default_rng(i), 64)).save(tmp_path / f"t{i}.png")
        frames.append(tmp_path / f"t{i}.png")
    none, why = auto_roi(frames, 64)
    assert none is None and not why["applied"] and "the whole image is judged" in why["reason"]
