"""Layer selection: block-level layers, the search space, one backbone pass, honest validation, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch

from defectscope.cli.commands import main
from defectscope.data.layouts import good_images, load_category
from defectscope.data.samples import Sample
from defectscope.detectors import make_detector
from defectscope.errors import BackboneError, DefectscopeError
from defectscope.evaluation import tune as T
from defectscope.features.backbones import FeatureExtractor, available_blocks, stage_blocks
from defectscope.io import read_metadata


def test_block_names() -> None:
    blocks = available_blocks("resnet18")
    assert blocks[:4] == ["act1", "layer1.0", "layer1.1", "layer1"]
    assert stage_blocks("resnet50")["layer3"] == [f"layer3.{i}" for i in range(6)]
    assert stage_blocks("tf_efficientnet_lite0")["blocks.4"] == ["blocks.4.0", "blocks.4.1", "blocks.4.2"]
    with pytest.raises(BackboneError, match=r"'layer2\.9'.*or blocks: layer1\.0, layer1\.1, layer2\.0"):
        FeatureExtractor("resnet18", ["layer2.9"], weights="none")


def test_block_features_equal_running_the_blocks_by_hand() -> None:
    fe = FeatureExtractor("resnet18", ["layer3.0", "layer1.0", "layer2"], weights="none")
    assert fe.layers == ("layer1.0", "layer2", "layer3.0")
    assert fe.channels == (64, 128, 256) and fe.strides == (4, 8, 16)
    assert len(fe.model.layer3) == 1 and not hasattr(fe.model, "layer4")  # cut after the deepest block
    full = timm.create_model("resnet18", pretrained=False).eval()
    full.load_state_dict(fe.model.state_dict(), strict=False)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        ours = fe(x)
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        l1_0 = full.layer1[0](h)
        l2 = full.layer2(full.layer1[1](l1_0))
        l3_0 = full.layer3[0](l2)
    for a, b in zip(ours, (l1_0, l2, l3_0)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_search_space_size_and_order() -> None:
    space = T.search_space("resnet50", ["layer1", "layer2", "layer3"])
    assert len(space) == (3 + 1) * (4 + 1) * (6 + 1) - 1  # a block per stage or the stage left out
    assert len(set(space)) == len(space)
    assert space[0] == ("layer1.0", "layer2.0", "layer3.0") and space[-1] == ("layer3",)
    assert ("layer1", "layer3.2") in space  # a stage's last block is named by the stage
    lite = T.search_space("tf_efficientnet_lite0", ["blocks.4", "blocks.2"])
    assert len(lite) == 3 * 4 - 1 and ("blocks.2", "blocks.4.1") in lite
    with pytest.raises(DefectscopeError, match="unknown stage 'layer9'"):
        T.search_space("resnet18", ["layer9"])


def test_choose_trials() -> None:
    space = T.search_space("resnet18", ["layer1", "layer2", "layer3"])
    assert T.choose_trials(space, None, "full") == space
    assert T.choose_trials(space, 4, "full") == space[:4]
    a, b = T.choose_trials(space, 5, "random", seed=1), T.choose_trials(space, 5, "random", seed=1)
    assert a == b and len(set(a)) == 5 and set(a) <= set(space)
    assert T.choose_trials(space, 5, "random", seed=2) != a
    with pytest.raises(DefectscopeError, match="max-trials"):
        T.choose_trials(space, 0, "random")


def test_validation_split_is_stratified_and_disjoint() -> None:
    samples = [Sample(Path(f"g{i}.png"), 0, "good") for i in range(10)]
    samples += [Sample(Path(f"s{i}.png"), 1, "scratch") for i in range(5)] + [Sample(Path("x.png"), 1, "spot")]
    val, rest = T.split_validation(samples, 0.3, seed=0)
    assert {s.path for s in val}.isdisjoint({s.path for s in rest}) and len(val) + len(rest) == len(samples)
    assert sum(s.defect_type == "good" for s in val) == 3 and sum(s.defect_type == "scratch" for s in val) == 2
    assert T.split_validation(samples, 0.3, seed=0) == (val, rest)


@pytest.fixture(scope="module")
def lite_cache(synthetic_category: Path) -> tuple[T.FeatureCache, list[Path]]:
    """float32 cache of two lite0 blocks on the synthetic category's training images."""
    train = good_images(synthetic_category)[:8]
    fe = FeatureExtractor("tf_efficientnet_lite0", ["blocks.1.0", "blocks.2"])
    return T.FeatureCache.build(fe, train, 64, batch_size=3, dtype=torch.float32), train


def test_cached_fit_equals_a_real_fit(lite_cache) -> None:
    """A detector fitted from the cache learns exactly what it learns from images."""
    cache, train = lite_cache
    assert cache.passes == 3  # one backbone pass per batch of images, for all layers together
    # the cache holds features of ImageNet-normalised images: both detectors use that normalisation
    for method, params in (
        ("padim", {"d_reduced": 20, "normalization": "imagenet"}),
        ("patchcore", {"coreset_ratio": 0.5, "normalization": "imagenet"}),
    ):
        real = make_detector(method, image_size=64, layers=["blocks.1.0", "blocks.2"], **params)
        from defectscope.fitting import fit_detector

        fit_detector(real, train, batch_size=3)
        cached = T._fit_cached(
            method, dict(image_size=64, **params), cache, ["blocks.1.0", "blocks.2"], cache.rows(train), 3
        )
        assert cached.layers == ["blocks.1.0", "blocks.2"]
        ref, got = real.state_dict(), cached.state_dict()
        assert ref.keys() == got.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-4, msg=f"{method} {key}")


def test_tune_uses_one_pass_and_scores_only_validation(synthetic_category: Path, monkeypatch) -> None:
    split = load_category(synthetic_category)
    val, held = T.split_validation(split.test, 0.5, seed=0)
    calls = []
    original = FeatureExtractor.forward

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(FeatureExtractor, "forward", counting)
    scored: list[list[int]] = []
    real_score = T.score_detector
    monkeypatch.setattr(
        T, "score_detector", lambda d, rows, *a, **k: (scored.append(list(rows)), real_score(d, rows, *a, **k))[1]
    )
    announced: list[str] = []
    result = T.tune_layers(
        "padim",
        good_images(synthetic_category)[:10],
        val,
        held,
        params={"image_size": 64, "d_reduced": 20},
        stages=["blocks.1", "blocks.2"],
        max_trials=3,
        search="random",
        validation_source="half",
        batch_size=8,
        announce=announced.append,
    )
    n_images = 10 + len(split.test)
    assert sum(calls) == n_images  # every image through the backbone exactly once
    assert "8 candidates" in announced[0] and "evaluating 3 of 8" in announced[0]
    assert len(result.rows) == 3 and [r["rank"] for r in result.rows] == [1, 2, 3]
    aucs = [r["image_auroc"] for r in result.rows]
    assert aucs == sorted(aucs, reverse=True)
    assert result.best == result.rows[0]["layers"].split(",")
    # the three candidates were scored on the validation rows only; the held-out rows once, for the winner
    cache_val = {len(r) for r in scored[:3]}
    assert cache_val == {len(val)} and len(scored[3]) == len(held)
    assert set(map(tuple, scored[:3])).isdisjoint({tuple(scored[3])})
    assert result.held_out["n_images"] == len(held) and result.validation["n_images"] == len(val)
    assert 0.0 <= result.held_out["image_auroc"] <= 1.0


def test_cli_tune_writes_tables_and_best_model(synthetic_category: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "best.dsm"
    code = main(
        [
            "tune",
            str(synthetic_category),
            "--method",
            "padim",
            "--image-size",
            "64",
            "--d-reduced",
            "20",
            "--layers",
            "blocks.1,blocks.2",
            "--max-trials",
            "2",
            "--search",
            "full",
            "--out",
            str(tmp_path / "t"),
            "--fit-best",
            "-o",
            str(model),
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "search space on tf_efficientnet_lite0: 8 candidates" in err
    assert "| rank | layers | image AUROC | pixel AUROC | seconds |" in out and "held-out" in out
    with open(tmp_path / "t" / "tune.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert (tmp_path / "t" / "tune.md").read_text().strip() == out.split("wrote")[0].strip()
    meta = read_metadata(model)
    assert meta["layers"] == rows[0]["layers"].split(",") == meta["tune"]["best"]
    assert main(["tune", str(synthetic_category), "--fit-best", "--no-progress"]) == 2
