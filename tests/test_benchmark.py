"""`defectscope benchmark`: tables, resumability, --force, failing cells (tiny synthetic data)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from synthetic import make_mvtec_category

from defectscope import benchmark
from defectscope.cli.commands import main

METHODS = ["patchcore", "spade"]
GOOD_CATS = ["cat_a", "cat_b"]
ARGS = ["--methods", *METHODS, "--image-size", "96", "--coreset-ratio", "0.5", "--no-progress"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny synthetic categories and a broken one (train/good without images)."""
    root = tmp_path_factory.mktemp("bench_root")
    for i, name in enumerate(GOOD_CATS):
        make_mvtec_category(root, name=name, n_train=6, n_test_good=3, n_test_defect=3, size=96, seed=i)
    (root / "broken" / "train" / "good").mkdir(parents=True)
    shutil.copytree(root / "cat_a" / "test", root / "broken" / "test")
    return root


@pytest.fixture(scope="module")
def first_run(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real run: every cell fitted and evaluated once."""
    out = tmp_path_factory.mktemp("bench_out") / "results"
    rc = main(["benchmark", str(root), *ARGS, "-o", str(out)])
    return {"rc": rc, "out": out}


def _copy(first_run: dict, tmp_path: Path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(first_run["out"], out)
    return out


def _fake_cell(calls: list[str]):
    def fake(method, params, category, out_dir, **kwargs):
        calls.append(f"{method}/{category.name}")
        category.load()  # the broken category still fails
        return {
            "status": "ok",
            "image_auroc": 0.5,
            "pixel_auroc": 0.25,
            "aupro": 0.125,
            "image_f1_max": 0.5,
            "fit_seconds": 1.0,
            "images_per_second": 2.0,
            "n_train": 6,
            "n_good": 3,
            "n_defective": 3,
            "n_failed": 0,
            "layers": ["x"],
            "threshold": 1.0,
        }

    return fake


def test_files_tables_and_error_row(first_run: dict) -> None:
    out = first_run["out"]
    assert first_run["rc"] == 1  # the broken category failed
    for name in (
        "benchmark.md",
        "benchmark.csv",
        "benchmark.json",
        "index.html",
        "patchcore/index.html",
        "spade/index.html",
    ):
        assert (out / name).is_file(), name
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert len(cells) == 4 and all(any(c.startswith(f"{m}-{k}-") for m in METHODS for k in GOOD_CATS) for c in cells)

    summary = json.loads((out / "benchmark.json").read_text())
    by = {(c["method"], c["category"]): c for c in summary["cells"]}
    assert set(by) == {(m, c) for m in METHODS for c in [*GOOD_CATS, "broken"]}
    for m in METHODS:
        assert by[(m, "broken")]["status"] == "error" and "train" in by[(m, "broken")]["error"]
        ok = [by[(m, c)] for c in GOOD_CATS]
        assert all(c["status"] == "ok" and 0 <= c["image_auroc"] <= 1 and c["pixel_auroc"] is not None for c in ok)
        assert all(c["fit_seconds"] > 0 and c["images_per_second"] > 0 and c["n_train"] == 6 for c in ok)
        mean = summary["means"][m]
        assert mean["n_ok"] == 2 and mean["n_categories"] == 3
        assert mean["image_auroc"] == pytest.approx(sum(c["image_auroc"] for c in ok) / 2)

    md = (out / "benchmark.md").read_text()
    assert md.count("| **mean (2 of 3)** |") == 2
    assert md.count("| broken | error:") == 2
    assert (
        "| category | image AUROC | pixel AUROC | AUPRO | catch @0.5 % FR | catch @1 % FR | catch @2 % FR | "
        "catch @5 % FR | fit s | images/s |" in md
    )
    assert "FR: false-reject rate" in md
    row = next(line for line in md.splitlines() if line.startswith("| cat_a |"))
    assert f"{by[('patchcore', 'cat_a')]['image_auroc']:.4f}" in row

    # the catch rate at each false-reject rate: the cell's operating points, in the table, and on the mean
    for m in METHODS:
        ok = [by[(m, c)] for c in GOOD_CATS]
        for cell in ok:
            rows = {row["target"]: row for row in cell["operating_points"]["at_false_reject"]}
            assert set(rows) == {0.005, 0.01, 0.02, 0.05}
            for target, key in ((0.005, "catch_at_fr_0.5pct"), (0.01, "catch_at_fr_1pct"), (0.05, "catch_at_fr_5pct")):
                assert cell[key] == rows[target]["catch"]["rate"] == rows[target]["catch"]["count"] / 3
            at = cell["operating_points"]["at_threshold"]
            assert cell["catch_at_threshold"] == at["catch"]["rate"]
            assert cell["false_reject_at_threshold"] == at["false_reject"]["rate"]
        mean = summary["means"][m]
        assert mean["catch_at_fr_1pct"] == pytest.approx(sum(c["catch_at_fr_1pct"] for c in ok) / 2)
        assert mean["n_with"]["catch_at_fr_1pct"] == 2
    cell = by[("patchcore", "cat_a")]
    assert f"| {cell['catch_at_fr_0.5pct']:.3f} | {cell['catch_at_fr_1pct']:.3f} |" in row

    rows = list(csv.DictReader((out / "benchmark.csv").open()))
    assert {"catch_at_fr_1pct", "catch_at_threshold", "false_reject_at_threshold"} <= set(rows[0])
    first = next(r for r in rows if r["method"] == "patchcore" and r["category"] == "cat_a")
    assert float(first["catch_at_fr_1pct"]) == pytest.approx(cell["catch_at_fr_1pct"])
    means = [r for r in rows if r["category"] == "mean"]
    assert [r["method"] for r in means] == METHODS
    assert float(means[0]["pixel_auroc"]) == pytest.approx(summary["means"]["patchcore"]["pixel_auroc"])
    assert 'href="patchcore/index.html"' in (out / "index.html").read_text()


def test_second_run_skips_finished_cells(
    first_run: dict, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = _copy(first_run, tmp_path)
    before = (out / "benchmark.json").read_text()

    def explode(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(benchmark, "run_cell", explode)
    rc = main(["benchmark", str(root), *ARGS, "-o", str(out), "--categories", *GOOD_CATS])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.err.count("done before, skipped") == 4
    assert "| **mean** |" in captured.out  # the printed Markdown
    old = {(c["method"], c["category"]): c for c in json.loads(before)["cells"]}
    for cell in json.loads((out / "benchmark.json").read_text())["cells"]:
        assert cell["image_auroc"] == old[(cell["method"], cell["category"])]["image_auroc"]


def test_force_recomputes_and_failed_cells_are_retried(
    first_run: dict, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _copy(first_run, tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(benchmark, "run_cell", _fake_cell(calls))
    assert main(["benchmark", str(root), *ARGS, "-o", str(out)]) == 1
    assert sorted(calls) == ["patchcore/broken", "spade/broken"]  # only the failed cells ran again
    calls.clear()
    assert main(["benchmark", str(root), *ARGS, "-o", str(out), "--force"]) == 1
    assert len(calls) == 6
    md = (out / "benchmark.md").read_text()
    assert md.count("| cat_a | 0.5000 | 0.2500 | 0.1250 | n/a | n/a | n/a | n/a | 1.0 | 2.00 |") == 2
    assert len(list((out / "cells").glob("*.json"))) == 4  # same keys: rewritten in place


def test_changed_parameters_do_not_reuse_cells(
    first_run: dict, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _copy(first_run, tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(benchmark, "run_cell", _fake_cell(calls))
    args = ["benchmark", str(root), "-o", str(out), "--categories", "cat_a", "--no-progress", "--image-size", "96"]
    assert main([*args, "--methods", "patchcore", "--coreset-ratio", "0.25"]) == 0
    assert calls == ["patchcore/cat_a"]
    assert main([*args, "--methods", "spade", "--k", "3"]) == 0
    assert calls == ["patchcore/cat_a", "spade/cat_a"]
    assert main([*args, "--methods", "spade", "--backbone", "resnet18", "--weights", "none"]) == 0
    assert len(calls) == 3
    # with both methods, --coreset-ratio goes to PatchCore only: SPADE's default cell (first run) is reused
    assert main([*args, "--methods", "patchcore", "spade", "--coreset-ratio", "0.25"]) == 0
    assert len(calls) == 3


def test_bad_arguments(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["benchmark", str(root), "-o", str(tmp_path), "--categories", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown category nope" in err and "cat_a, cat_b" in err
    assert main(["benchmark", str(root), "-o", str(tmp_path), "--methods", "spade", "--d-reduced", "5"]) == 2
    assert "--d-reduced is a padim option; --methods spade does not take it" in capsys.readouterr().err


def test_cells_of_an_earlier_version_are_reused_when_they_compute_the_same(
    first_run: dict, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An earlier version keyed cells on every parameter it had: a cell written before layer_weighting existed
    (plain concatenation) is found again by `--layer-weighting channels`, not by the new default."""
    out = _copy(first_run, tmp_path)
    cells = out / "cells"
    for path in cells.glob("patchcore-*.json"):  # rewrite them as the earlier version did: other key, no parameter
        cell = json.loads(path.read_text())
        assert cell["params"].pop("layer_weighting") == "equal"
        path.unlink()
        (cells / f"patchcore-{cell['category']}-0123456789ab.json").write_text(json.dumps(cell))
    calls: list[str] = []
    monkeypatch.setattr(benchmark, "run_cell", _fake_cell(calls))
    args = ["benchmark", str(root), *ARGS, "-o", str(out), "--categories", *GOOD_CATS, "--methods", "patchcore"]
    assert main([*args, "--layer-weighting", "channels"]) == 0
    assert calls == [] and capsys.readouterr().err.count("0123456789ab.json; --force recomputes)") == 2
    assert main(args) == 0  # the default, equal, computes something else
    assert sorted(calls) == ["patchcore/cat_a", "patchcore/cat_b"]
    assert "layer weighting equal" in (out / "benchmark.md").read_text()


def test_a_mean_over_fewer_cells_says_so() -> None:
    """Cells stored before the catch rate was recorded lack it: the mean names how many cells it is over."""
    base = {"method": "patchcore", "status": "ok", "backbone": "b", "params": {}, "image_auroc": 0.9}
    cells = [
        {**base, "category": "a", "catch_at_fr_1pct": 0.8},
        {**base, "category": "b", "catch_at_fr_1pct": 0.6},
        {**base, "category": "c"},  # an older cell
    ]
    md = benchmark.format_markdown(cells)
    mean = next(line for line in md.splitlines() if line.startswith("| **mean**"))
    assert "**0.700** (2 of 3)" in mean and "**0.9000** |" in mean
    assert "| c | 0.9000 | n/a | n/a | n/a | n/a | n/a |" in md
