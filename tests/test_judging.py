"""Judging by region: connected regions against a brute-force flood fill, the rule's options, its
threshold from held-out maps, the model-file round trip, and models without a rule left as they were."""

from __future__ import annotations

import json
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import defectscope
from defectscope.cli.commands import main
from defectscope.components.regions import integrated_anomaly, label_regions, region_level, region_stats
from defectscope.errors import DefectscopeError
from defectscope.judging import JUDGE_RULES, JudgeRule


# ----------------------------------------------------------------------------------------- reference
def _flood_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Every 8-connected region of ``mask`` by breadth-first flood fill (the reference)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            queue, region = deque([(y, x)]), []
            while queue:
                a, b = queue.popleft()
                region.append((a, b))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = a + dy, b + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            queue.append((yy, xx))
            regions.append(region)
    return regions


def _brute_level(amap: np.ndarray, n: int) -> float:
    """The highest value t with a flood-filled region of {map >= t} of >= n pixels, trying every value."""
    n = min(n, amap.size)
    for t in sorted(np.unique(amap))[::-1]:
        if max(len(r) for r in _flood_regions(amap >= t)) >= n:
            return float(t)
    raise AssertionError("unreachable: the whole map is one region at its minimum")


def _random_maps(count: int, seed: int) -> list[np.ndarray]:
    """Small maps with many ties (few distinct values) and smooth ones (few ties), of varied shapes."""
    rng = np.random.default_rng(seed)
    maps = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 10, 2))
        if i % 2:
            maps.append(rng.integers(0, 4, (h, w)).astype(np.float32))
        else:
            maps.append(rng.normal(size=(h, w)).astype(np.float32))
    return maps


def test_region_level_matches_brute_force_flood_fill():
    rng = np.random.default_rng(1)
    for amap in _random_maps(300, seed=0):
        for n in {1, int(rng.integers(1, amap.size + 1)), amap.size, amap.size + 5}:
            assert region_level(amap, n) == _brute_level(amap, n), (amap, n)


def test_region_level_searches_further_when_the_highest_pixels_form_no_region():
    # the 144 highest pixels lie on every other row and column, none touching another: a region of two
    # forms only once lower pixels join, beyond the first (16 n) and second (64 n) pixels searched
    rng = np.random.default_rng(3)
    amap = rng.random((24, 24)).astype(np.float32)
    amap[::2, ::2] += 10.0
    for n in (2, 3, 9, 40, 300):
        assert region_level(amap, n) == _brute_level(amap, n)
    assert region_level(amap, 2) < 10.0


def test_regions_are_8_connected():
    diagonal = np.eye(4, dtype=np.float32)  # four pixels touching only at corners
    assert region_level(diagonal, 4) == 1.0  # one region of four at level 1
    assert label_regions(diagonal, 1.0)[1] == 1
    plus_gap = np.zeros((3, 3), np.float32)
    plus_gap[0, 0] = plus_gap[2, 2] = 1.0  # two pixels with a gap between them
    assert label_regions(plus_gap, 1.0)[1] == 2 and region_level(plus_gap, 2) == 0.0


def test_region_stats_match_brute_force():
    for amap in _random_maps(200, seed=5):
        level = float(np.median(amap))
        regions = _flood_regions(amap >= level)
        stats = region_stats(amap, level, pixel_area=2.5)
        assert stats.count == len(regions)
        assert stats.largest == pytest.approx(2.5 * max((len(r) for r in regions), default=0))
        best = max((sum(float(amap[p]) - level for p in r) for r in regions), default=0.0)
        assert stats.integrated == pytest.approx(2.5 * best, abs=1e-9)
        assert integrated_anomaly(amap, level, 2.5) == stats.integrated


def test_maps_the_rules_cannot_read_are_refused():
    with pytest.raises(DefectscopeError, match="one \\(H, W\\) anomaly map"):
        region_level(np.zeros((2, 2, 2)), 1)
    with pytest.raises(DefectscopeError, match="NaN"):
        region_level(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(DefectscopeError, match="min_pixels"):
        region_level(np.zeros((2, 2)), 0)


# ----------------------------------------------------------------------------------------- the rule
def test_the_rule_options_are_checked_with_the_option_named():
    assert JudgeRule.make("max") is None
    assert JudgeRule.make("region", min_region_pixels=50) == JudgeRule("region", min_region=50.0)
    rule = JudgeRule.make("region", min_region_area=0.5, pixel_size=0.1)
    assert rule is not None and rule.unit == "mm2" and rule.min_region == 0.5
    assert JudgeRule.make("integrated").level_quantile == 0.9  # type: ignore[union-attr]
    bad = [
        ({"rule": "blob"}, "unknown judge rule 'blob'"),
        ({"rule": "region"}, "min_region_pixels .* or min_region_area"),
        ({"rule": "region", "min_region_pixels": 5, "min_region_area": 1.0}, "one of them"),
        ({"rule": "region", "min_region_area": 1.0}, "give pixel_size"),
        ({"rule": "region", "min_region_pixels": 5, "pixel_size": 0.1}, "pixel_size goes with min_region_area"),
        ({"rule": "region", "min_region_pixels": -3}, "min_region_pixels must be a positive"),
        ({"rule": "region", "min_region_pixels": float("nan")}, "positive finite"),
        ({"rule": "max", "min_region_pixels": 5}, "min_region_pixels is for judging by region"),
        ({"rule": "integrated", "min_region_pixels": 5}, "takes no minimum region"),
        ({"rule": "integrated", "level_quantile": 1.0}, "level_quantile must be in \\(0, 1\\)"),
    ]
    for kwargs, message in bad:
        rule_name = kwargs.pop("rule")
        with pytest.raises(DefectscopeError, match=message):
            JudgeRule.make(str(rule_name), **kwargs)  # type: ignore[arg-type]


def test_areas_are_counted_over_the_photo():
    rule = JudgeRule("region", min_region=100.0)
    # a 32 x 32 map over a 320 x 160 photo: each map pixel covers 10 x 5 = 50 photo pixels
    assert rule.pixel_area((320, 160), (32, 32)) == 50.0 and rule.min_pixels(50.0) == 2
    mm = JudgeRule("region", min_region=1.0, pixel_size=0.1)  # 1 mm^2 = 100 photo pixels at 0.1 mm
    assert mm.pixel_area((320, 160), (32, 32)) == pytest.approx(0.5) and mm.min_pixels(0.5) == 2
    assert rule.min_pixels(1000.0) == 1  # never below one map pixel


def _spot_and_patch() -> tuple[np.ndarray, np.ndarray]:
    """Two 40 x 40 maps: a small strong spot (2 x 2 at 5.0) and a larger fainter defect (8 x 8 at 2.0)."""
    spot = np.zeros((40, 40), np.float32)
    spot[5:7, 5:7] = 5.0
    patch = np.zeros((40, 40), np.float32)
    patch[20:28, 20:28] = 2.0
    return spot, patch


def test_a_small_strong_spot_and_a_larger_defect_are_judged_as_each_rule_says():
    spot, patch = _spot_and_patch()
    photo = (40, 40)  # one photo pixel per map pixel
    threshold = 1.0
    # max: the spot scores higher than the larger defect
    assert spot.max() > patch.max()
    # region >= 16 px: the 4-pixel spot is no region that rejects, the 64-pixel defect is
    rule = JudgeRule("region", min_region=16.0)
    assert rule.score(spot, photo) < threshold <= rule.score(patch, photo)
    assert rule.regions(spot, photo, threshold) == {
        "level": 1.0,
        "unit": "px",
        "count": 1,
        "rejecting": 0,
        "largest_area": 4.0,
    }
    assert rule.regions(patch, photo, threshold)["rejecting"] == 1
    # integrated above level 1: the spot weighs 4 x 4 = 16, the defect 64 x 1 = 64
    integrated = JudgeRule("integrated", level_quantile=0.9, level=1.0)
    assert integrated.score(spot, photo) == pytest.approx(16.0)
    assert integrated.score(patch, photo) == pytest.approx(64.0)


class _BrightnessDetector:
    """A stand-in detector whose map is the image's brightness: a bright mark is an anomalous region."""

    method = "patchcore"
    backbone = "none"
    layers = ("none",)
    image_size = 40
    resize = "stretch"
    input_shape = (40, 40)
    input_stats = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def predict(self, images: torch.Tensor) -> SimpleNamespace:
        maps = images.mean(dim=1).numpy().astype(np.float32)
        return SimpleNamespace(scores=maps.max(axis=(1, 2)), maps=maps)


def test_a_model_judged_by_region_scores_and_judges_images_by_the_rule(tmp_path):
    from defectscope.api import Model

    # 80 x 80 photos (each map pixel covers 4 photo pixels): a small bright spot, a larger dim mark
    spot = np.zeros((80, 80, 3), np.uint8)
    spot[10:14, 10:14] = 250  # 16 photo pixels
    patch = np.zeros((80, 80, 3), np.uint8)
    patch[40:56, 40:56] = 120  # 256 photo pixels
    for name, image in (("spot", spot), ("patch", patch)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    meta = {"threshold": 0.3, "pixel_threshold": 0.3}
    by_max = Model(_BrightnessDetector(), dict(meta))  # type: ignore[arg-type]
    rule = JudgeRule("region", min_region=100.0)  # 100 photo pixels: 25 map pixels
    by_region = Model(_BrightnessDetector(), {**meta, "judge": rule.to_meta()})  # type: ignore[arg-type]
    paths = [tmp_path / "spot.png", tmp_path / "patch.png"]
    assert [r.judgement for r in by_max.predict(paths)] == [1, 1]
    assert [r.regions for r in by_max.predict(paths)] == [None, None]
    spot_result, patch_result = by_region.predict(paths)
    assert (spot_result.judgement, patch_result.judgement) == (0, 1)
    assert spot_result.score < 0.3 <= patch_result.score
    assert patch_result.regions["rejecting"] == 1 and patch_result.regions["largest_area"] >= 100
    assert spot_result.regions["rejecting"] == 0 and spot_result.regions["count"] == 1
    assert patch_result.as_dict()["regions"] == patch_result.regions
    # the overlay outlines the regions at the level that decides: the threshold
    assert patch_result.pixel_threshold == 0.3


# ----------------------------------------------------------------------------------------- with a fit
@pytest.fixture(scope="module")
def fitted(synthetic_category, tmp_path_factory):
    """The synthetic category fitted twice, by max and by region (>= 200 photo pixels), and saved."""
    folder = tmp_path_factory.mktemp("judging")
    models = {}
    for name, rule in (("max", {}), ("region", {"judge": "region", "min_region_pixels": 200})):
        model = defectscope.fit(synthetic_category, image_size=128, coreset_ratio=0.25, **rule)
        model.save(folder / f"{name}.dsmodel")
        models[name] = model
    return models


def test_the_rule_threshold_comes_from_the_held_out_maps(fitted):
    model = fitted["region"]
    detector = model.detector
    maps = detector.training_maps()
    # the held-out maps are the ones the pixel threshold's maxima came from
    np.testing.assert_allclose(maps.max(axis=(1, 2)), detector.training_map_maxima(), rtol=1e-6)
    info = model.meta["threshold_info"]
    assert info["n_images"] == len(maps) and "a region of >= 200 pixels" in info["rule"]
    assert model.meta["judge"] == {"rule": "region", "unit": "px", "pixel_size": None, "min_region": 200.0}
    assert model.meta["score_threshold"] == pytest.approx(fitted["max"].threshold)
    # 128 x 128 photos at 128 px: one photo pixel per map pixel, so the rule's scores are region levels of 200
    levels = np.array([region_level(m, 200) for m in maps])
    assert model.threshold == pytest.approx(float(np.quantile(levels, 0.99)))
    assert model.threshold <= model.meta["pixel_threshold"]  # a level reached by 200 pixels is below the max's


def test_the_rule_round_trips_through_the_model_file(fitted, synthetic_category, tmp_path):
    model = fitted["region"]
    loaded = defectscope.load(model.path)
    assert loaded.meta["judge"] == model.meta["judge"] and loaded.threshold == model.threshold
    assert loaded.meta["format_version"] == 2 and loaded.info()["judge"]["rule"] == "region"
    paths = sorted((synthetic_category / "test").rglob("*.png"))
    before, after = model.predict(paths, maps=False), loaded.predict(paths, maps=False)
    assert [r.score for r in before] == [r.score for r in after]
    assert [r.judgement for r in after] == [int(r.score >= loaded.threshold) for r in after]
    assert all(r.regions is not None and r.regions["level"] == loaded.threshold for r in after)
    # by region, defective images are still told from good ones
    labels = [0 if p.parent.name == "good" else 1 for p in paths]
    from defectscope.evaluation.metrics import image_auroc

    assert image_auroc(np.array(labels), np.array([r.score for r in after])) > 0.8
    # evaluate goes through the rule too: its scores are predict's
    result = loaded.evaluate(synthetic_category)
    by_path = {str(p): r.score for p, r in zip(paths, after)}
    for record in result["images"]:
        assert record["score"] == pytest.approx(by_path[record["path"]], rel=1e-5)


def test_models_without_a_rule_are_judged_by_their_score_as_before(fitted, synthetic_category):
    model = defectscope.load(fitted["max"].path)
    assert "judge" not in model.meta and model.meta["format_version"] == 1 and model.judge is None
    assert model.info()["judge"] == {"rule": "max"}
    paths = sorted((synthetic_category / "test").rglob("*.png"))[:8]
    results = model.predict(paths, maps=False)
    from defectscope.data.loader import iter_batches

    mean, std = model.detector.input_stats
    batch = next(iter_batches(paths, model.detector.input_shape, mean, std, batch_size=len(paths)))
    raw = model.detector.predict(batch.images).scores
    assert [r.score for r in results] == [float(s) for s in raw]  # bit for bit the detector's score
    assert all(r.regions is None and "regions" not in r.as_dict() for r in results)


def test_methods_without_held_out_maps_are_refused_before_the_fit(synthetic_category):
    with pytest.raises(DefectscopeError, match="padim does not give: fit with method patchcore"):
        defectscope.fit(synthetic_category, method="padim", judge="region", min_region_pixels=10)


def test_a_minimum_region_larger_than_the_photo_is_refused_before_the_fit(synthetic_category):
    with pytest.raises(DefectscopeError, match="larger than the training image .*\\(128x128 pixels"):
        defectscope.fit(synthetic_category, judge="region", min_region_pixels=128 * 128 + 1)
    with pytest.raises(DefectscopeError, match="mm per pixel"):
        defectscope.fit(synthetic_category, judge="region", min_region_area=2.0, pixel_size=0.01)


def test_the_command_line_fits_and_predicts_by_region(fitted, synthetic_category, tmp_path, capsys):
    out = tmp_path / "cli.dsmodel"
    code = main(
        [
            "fit",
            str(synthetic_category),
            "-o",
            str(out),
            "--image-size",
            "128",
            "--coreset-ratio",
            "0.25",
            "--judge",
            "region",
            "--min-region-pixels",
            "200",
            "--no-progress",
        ]
    )
    assert code == 0 and "judged by a region of >= 200 pixels above the threshold" in capsys.readouterr().out
    assert defectscope.load(out).threshold == fitted["region"].threshold  # the API's fit, from the command line
    paths = sorted((synthetic_category / "test").rglob("*.png"))[:3]
    assert main(["predict", str(out), *map(str, paths), "--json", "--no-progress"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = fitted["region"].predict(paths, maps=False)
    for line, result in zip(lines, expected):
        assert line["score"] == pytest.approx(result.score, rel=1e-6) and line["judgement"] == result.judgement
        assert set(line["regions"]) == {"level", "unit", "count", "rejecting", "largest_area"}
    with pytest.raises(SystemExit):
        main(["fit", str(synthetic_category), "-o", str(out), "--judge", "region", "--min-region-pixels", "-1"])
    assert "--min-region-pixels" in capsys.readouterr().err
    assert main(["fit", str(synthetic_category), "-o", str(tmp_path / "x.dsmodel"), "--judge", "region"]) != 0
    err = capsys.readouterr().err
    assert "--judge region needs" in err and "--min-region-pixels" in err and "--min-region-area" in err


def test_the_parser_names_the_rules_the_library_knows():
    from defectscope.cli.options import JUDGE_CHOICES

    assert tuple(JUDGE_CHOICES) == tuple(JUDGE_RULES)


def test_a_rule_in_the_metadata_this_version_cannot_read_is_refused():
    with pytest.raises(DefectscopeError, match="upgrade defectscope"):
        JudgeRule.from_meta({"judge": {"rule": "texture"}})
    with pytest.raises(DefectscopeError, match="not readable"):
        JudgeRule.from_meta({"judge": {"rule": "region", "min_region": "many"}})
    assert JudgeRule.from_meta({}) is None and JudgeRule.from_meta({"judge": {"rule": "max"}}) is None


def test_an_exported_model_is_judged_by_its_rule_without_torch(fitted, synthetic_category, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from defectscope.export.exporter import MAP_TOL, export_model

    model = fitted["region"]
    meta = export_model(model.path, tmp_path / "exported")
    assert meta["export_format_version"] == 2 and meta["judge"] == model.meta["judge"]
    exported = defectscope.load(tmp_path / "exported")
    assert exported.runtime == "onnxruntime" and exported.judge == model.judge
    paths = sorted((synthetic_category / "test").rglob("*.png"))[::4]
    for a, b in zip(model.predict(paths), exported.predict(paths)):
        # the export's map is within MAP_TOL of the map's range of torch's; a region level moves no more
        # than the map does (a shift of every pixel by at most e shifts every level set's level by at most e)
        tol = 2 * MAP_TOL * float(np.ptp(a.anomaly_map))
        assert abs(b.score - a.score) <= tol, a.name
        assert b.regions is not None and b.regions["level"] == exported.threshold
        if abs(a.score - model.threshold) > tol:
            assert a.judgement == b.judgement, a.name
    plain = export_model(fitted["max"].path, tmp_path / "plain")
    assert plain["export_format_version"] == 1 and "judge" not in plain


def test_the_integrated_rule_takes_its_level_from_the_held_out_maxima(fitted, synthetic_category):
    from defectscope.fitting import judge_threshold

    detector = fitted["max"].detector  # fitted in this process: its held-out maps are there
    sizes = [(128, 128)] * detector.n_train_
    rule, info = judge_threshold(detector, JudgeRule.make("integrated", level_quantile=0.5), sizes, 0.99)
    maxima = detector.training_map_maxima()
    assert rule.level == pytest.approx(float(np.quantile(maxima, 0.5)), rel=1e-6)
    values = [rule.score(m, (128, 128)) for m in detector.training_maps()]
    assert info["threshold"] == pytest.approx(float(np.quantile(values, 0.99))) and info["threshold"] > 0
    with pytest.raises(DefectscopeError, match="must be below the threshold quantile 0.99"):
        defectscope.fit(synthetic_category, judge="integrated", level_quantile=0.995)
    with pytest.raises(NotImplementedError, match="only in the process that fitted"):
        defectscope.load(fitted["max"].path).detector.training_maps()


# ----------------------------------------------------------------------------------------- top-k mean
def test_score_patches_is_the_mean_of_the_k_largest_patch_distances(fitted, synthetic_category):
    from defectscope.data.loader import iter_batches
    from defectscope.detectors.patchcore import PatchCore

    base = fitted["max"].detector
    paths = sorted((synthetic_category / "test").rglob("*.png"))[::5]
    mean, std = base.input_stats
    images = next(iter_batches(paths, base.input_shape, mean, std, batch_size=len(paths))).images
    bank = base.memory_bank_.double().numpy()
    feats = base._patch_features(images).double().numpy()  # (B, h, w, D)
    for k in (1, 5, 10**6):
        top = PatchCore(**{**base.get_params(), "score_patches": k})
        top.set_extractor(base.extractor)
        top.load_state(base.state_dict())
        scores = top.predict(images).scores
        for i in range(len(paths)):
            patches = feats[i].reshape(-1, feats.shape[-1])
            # brute force: every patch's distance to its nearest bank entry
            sq = (patches**2).sum(1)[:, None] - 2 * patches @ bank.T + (bank**2).sum(1)[None, :]
            nearest = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
            if k == 1:  # the re-weighted maximum (eq. 7) is no more than the largest distance
                assert scores[i] <= nearest.max() * (1 + 1e-5)
            else:
                expected = np.sort(nearest)[::-1][: min(k, nearest.size)].mean()
                assert scores[i] == pytest.approx(expected, rel=1e-4)
    for bad in (0, 2.5, True):
        with pytest.raises(DefectscopeError, match="score_patches must be a whole number"):
            PatchCore(score_patches=bad)._validate_params()


def test_top_k_models_round_trip_and_export(synthetic_category, tmp_path):
    model = defectscope.fit(synthetic_category, image_size=128, coreset_ratio=0.25, score_patches=5)
    model.save(tmp_path / "top5.dsmodel")
    loaded = defectscope.load(tmp_path / "top5.dsmodel")
    assert loaded.detector.score_patches == 5 and loaded.meta["format_version"] == 1
    paths = sorted((synthetic_category / "test").rglob("*.png"))[::4]
    scores = [r.score for r in loaded.predict(paths, maps=False)]
    assert [r.score for r in model.predict(paths, maps=False)] == scores
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from defectscope.export.exporter import SCORE_RTOL, export_model

    export_model(tmp_path / "top5.dsmodel", tmp_path / "top5-onnx")
    exported = defectscope.load(tmp_path / "top5-onnx").predict(paths, maps=False)
    assert [r.score for r in exported] == pytest.approx(scores, rel=SCORE_RTOL)


# ----------------------------------------------------------------------------------------- front ends
def test_serve_and_batch_judge_by_the_rule(fitted, synthetic_category, tmp_path):
    model = defectscope.load(fitted["region"].path)
    paths = sorted((synthetic_category / "test").rglob("*.png"))[::6]
    expected = {str(p): r for p, r in zip(paths, model.predict(paths, maps=False))}
    from defectscope.batch.sinks import read_output

    out = tmp_path / "rows.csv"
    assert main(["batch", str(model.path), *map(str, paths), "-o", str(out), "--no-progress"]) == 0
    for row in read_output(out):  # batch runs the model's onnxruntime export (runtime auto): the rule, on its map
        want = expected[row["path"]]
        assert row["score"] == pytest.approx(want.score, rel=1e-4) and row["judgement"] == want.judgement
    pytest.importorskip("fastapi")
    import httpx
    from serving import running

    from defectscope.serve.app import create_app

    with running(create_app({"part": model})) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/v1/models/part/predict", content=paths[0].read_bytes()).json()
    want = expected[str(paths[0])]
    assert answer["score"] == pytest.approx(want.score, rel=1e-5) and answer["judgement"] == want.judgement
    assert answer["regions"]["level"] == model.threshold and answer["regions"]["unit"] == "px"
