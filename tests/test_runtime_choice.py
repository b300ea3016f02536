"""The runtime serve and batch score with by default (issue #16): "auto" runs a model file's onnxruntime
export when the model can be exported and the export extra is installed, else torch, and says why."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import defectscope  # noqa: E402
from defectscope.api import choose_runtime  # noqa: E402
from defectscope.cli import main  # noqa: E402
from defectscope.errors import DefectscopeError  # noqa: E402
from defectscope.export.exporter import MAP_TOL, SCORE_RTOL  # noqa: E402


@pytest.fixture(scope="module")
def train(synthetic_category):
    return synthetic_category / "train" / "good"


@pytest.fixture(scope="module")
def patchcore_file(train, tmp_path_factory):
    return defectscope.fit(train, method="patchcore", image_size=64, coreset_ratio=0.25).save(
        tmp_path_factory.mktemp("runtime") / "patchcore.dsmodel")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTSCOPE_CACHE", str(tmp_path / "cache"))


def _tests(category, n=6):
    paths = sorted((category / "test").rglob("*.png"))
    return [str(p) for p in paths[:: max(1, len(paths) // n)][:n]]


def test_auto_scores_an_exportable_model_with_its_onnxruntime_export(patchcore_file, synthetic_category):
    torch_model = defectscope.load(patchcore_file)
    auto = defectscope.load(patchcore_file, runtime="auto")
    assert torch_model.runtime is None and auto.runtime == "onnxruntime" and auto.requested_runtime == "auto"
    assert auto.runtime_reason.startswith("onnxruntime") and auto.info()["runtime"] == "onnxruntime"
    assert auto.checksum == torch_model.checksum and auto.threshold == torch_model.threshold
    images = _tests(synthetic_category)
    for a, b in zip(torch_model.predict(images), auto.predict(images)):
        assert b.score == pytest.approx(a.score, rel=SCORE_RTOL) and a.judgement == b.judgement
        assert abs(a.anomaly_map - b.anomaly_map).max() <= MAP_TOL * float(np.ptp(a.anomaly_map))
    assert defectscope.load(patchcore_file, runtime="torch").runtime is None  # "torch" is torch


@pytest.mark.parametrize("method,params,why", [
    ("spade", {}, "SPADE models cannot be exported"),
    ("patchcore", {"tiles": 2}, "--tile 2"),
    ("patchcore", {"resize": "keep-aspect"}, "stretch protocol"),
    ("patchcore", {"image_size": (64, 96)}, "square input"),
])
def test_auto_keeps_torch_for_what_cannot_be_exported_and_says_why(train, tmp_path, method, params, why):
    path = defectscope.fit(train, method=method, **{"image_size": 64, **params}).save(tmp_path / "m.dsmodel")
    model = defectscope.load(path, runtime="auto")
    assert model.runtime is None and why in model.runtime_reason and model.runtime_reason.startswith("torch")
    assert not (tmp_path / "cache" / "exports").exists()  # nothing was exported


def test_auto_with_an_alignment_keeps_torch(train, tmp_path):
    path = defectscope.fit(train, method="patchcore", image_size=64, align="rot90").save(tmp_path / "m.dsmodel")
    model = defectscope.load(path, runtime="auto")
    assert model.runtime is None and "fitted with --align" in model.runtime_reason
    assert defectscope.load(path, runtime="auto", align="none").runtime is None  # still the aligned model's file


def test_auto_without_the_export_extra_is_torch_with_the_install_hint(patchcore_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    runtime, reason = choose_runtime(patchcore_file, "auto")
    assert runtime is None and "onnxruntime not installed" in reason and "defectscope[export]" in reason


def test_a_failed_export_falls_back_to_torch_with_a_warning(patchcore_file, monkeypatch, caplog):
    import defectscope.export.exporter as exporter

    def refuse(*args, **kwargs):
        raise DefectscopeError("the exported graph disagrees with torch (simulated)")

    monkeypatch.setattr(exporter, "export_model", refuse)
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        model = defectscope.load(patchcore_file, runtime="auto")
    assert model.runtime is None and "export failed" in model.runtime_reason
    assert "scoring with torch" in caplog.text


def test_unknown_runtimes_are_refused(patchcore_file):
    with pytest.raises(DefectscopeError, match="unknown runtime 'tensorrt'"):
        choose_runtime(patchcore_file, "tensorrt")


def test_batch_runs_on_auto_by_default_and_on_torch_when_asked(patchcore_file, synthetic_category, tmp_path, capsys):
    import pyarrow.parquet as pq

    images = _tests(synthetic_category)
    reference = {r.name: r for r in defectscope.load(patchcore_file).predict(images, maps=False)}
    rows = {}
    for runtime in ("auto", "torch"):
        out = tmp_path / f"{runtime}.parquet"
        args = ["batch", str(patchcore_file), *images, "-o", str(out), "--no-progress"]
        assert main(args + ([] if runtime == "auto" else ["--runtime", runtime])) == 0
        said = capsys.readouterr().err
        assert ("on onnxruntime: the model's export" if runtime == "auto" else "on torch") in said
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["runs"][-1]["runtime"] == ("onnxruntime" if runtime == "auto" else "torch")
        rows[runtime] = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    for path, want in reference.items():
        assert rows["torch"][path]["score"] == want.score  # torch when asked: the very same numbers
        assert rows["auto"][path]["score"] == pytest.approx(want.score, rel=SCORE_RTOL)
        assert rows["auto"][path]["judgement"] == rows["torch"][path]["judgement"] == want.judgement
