"""The runtime serve and batch score with by default (issue #16): "auto" runs a model file's onnxruntime
export when the model can be exported and the export extra is installed, else torch, and says why."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import defectscope
from defectscope.api import choose_runtime
from defectscope.cli.commands import main
from defectscope.errors import DefectscopeError
from defectscope.export.exporter import MAP_TOL, SCORE_RTOL


@pytest.fixture(scope="module")
def train(synthetic_category):
    return synthetic_category / "train" / "good"


@pytest.fixture(scope="module")
def patchcore_file(train, tmp_path_factory):
    return defectscope.fit(train, method="patchcore", image_size=64, coreset_ratio=0.25).save(
        tmp_path_factory.mktemp("runtime") / "patchcore.dsmodel"
    )


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


@pytest.mark.parametrize(
    "method,params,why",
    [
        ("spade", {}, "SPADE models cannot be exported"),
        ("patchcore", {"tiles": 2}, "--tile 2"),
        ("patchcore", {"resize": "keep-aspect"}, "stretch protocol"),
        ("patchcore", {"image_size": (64, 96)}, "square input"),
    ],
)
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


def _edited(source, target, old: bytes, new: bytes):
    data = source.read_bytes()
    assert old in data
    target.write_bytes(data.replace(old, new, 1))
    return target


def test_a_damaged_or_edited_file_is_refused_even_with_its_export_cached(patchcore_file, tmp_path):
    """The cached export is keyed by the checksum written in the file: the file is verified before it is used."""
    from defectscope.errors import ModelFileError

    assert defectscope.load(patchcore_file, runtime="auto").runtime == "onnxruntime"  # the export is cached now
    truncated = tmp_path / "truncated.dsmodel"
    truncated.write_bytes(patchcore_file.read_bytes()[:5000])
    threshold = json.dumps(defectscope.load(patchcore_file).threshold).encode()
    edited = _edited(patchcore_file, tmp_path / "edited.dsmodel", threshold, threshold[:-1] + b"9")
    for bad in (truncated, edited):
        for runtime in ("auto", "onnxruntime"):
            with pytest.raises(ModelFileError, match="truncated|damaged or was edited"):
                defectscope.load(bad, runtime=runtime)


def test_an_unwritable_cache_falls_back_to_torch_under_auto(patchcore_file, monkeypatch, caplog):
    import errno

    import defectscope.export.exporter as exporter

    def read_only(model_path, output, fmt="onnx", **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(output))

    monkeypatch.setattr(exporter, "export_model", read_only)
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        model = defectscope.load(patchcore_file, runtime="auto")
    assert model.runtime is None and "read-only file system" in model.runtime_reason
    with pytest.raises(OSError):  # asked for by name: the error, not a silent change of runtime
        defectscope.load(patchcore_file, runtime="onnxruntime")


@pytest.mark.parametrize("leftover", ["folder", "file"])
def test_an_incomplete_cache_entry_is_made_again(patchcore_file, leftover):
    from defectscope.export import EXPORT_FILE
    from defectscope.export.exporter import cached_export

    folder = cached_export(patchcore_file)
    if leftover == "folder":
        (folder / EXPORT_FILE).unlink()
    else:
        import shutil

        shutil.rmtree(folder)
        folder.write_text("not an export")
    model = defectscope.load(patchcore_file, runtime="auto")
    assert model.runtime == "onnxruntime" and (folder / EXPORT_FILE).is_file()


def test_an_exported_folder_runs_on_its_own_runtime_and_refuses_torch(patchcore_file, tmp_path):
    from defectscope.export.exporter import export_model

    export_model(patchcore_file, tmp_path / "ov", "openvino")
    assert choose_runtime(tmp_path / "ov", "auto") == ("openvino", "openvino: the exported model's own runtime")
    assert defectscope.load(tmp_path / "ov", runtime="auto").runtime == "openvino"
    with pytest.raises(DefectscopeError, match="exported model.*not torch.*model file"):
        defectscope.load(tmp_path / "ov", runtime="torch")
    assert (
        main(
            [
                "batch",
                str(tmp_path / "ov"),
                str(patchcore_file.parent),
                "-o",
                str(tmp_path / "o.csv"),
                "--runtime",
                "torch",
            ]
        )
        == 2
    )
    with pytest.raises(DefectscopeError, match="unknown runtime 'onnx': use one of auto, torch, onnxruntime"):
        defectscope.load(patchcore_file, runtime="onnx")
    assert defectscope.load(patchcore_file).runtime_reason == "torch (defectscope.load's default)"


def test_serve_warms_up_non_square_and_tiled_models(train, tmp_path):
    pytest.importorskip("fastapi")
    from defectscope.serve.batching import warm_up

    for name, params in (("wide", {"image_size": (64, 96)}), ("tiled", {"image_size": 64, "tiles": 2})):
        path = defectscope.fit(train, method="patchcore", **params).save(tmp_path / f"{name}.dsmodel")
        model = warm_up(defectscope.load(path, runtime="auto"))
        assert model.runtime is None and model.info()["tiles"] == params.get("tiles", 1)


def test_resuming_on_another_runtime_is_said(patchcore_file, synthetic_category, tmp_path, caplog):
    from defectscope.batch import run_batch

    images = _tests(synthetic_category)
    out = tmp_path / "scores.parquet"
    run_batch(patchcore_file, images[:3], out, runtime="torch")
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        summary = run_batch(patchcore_file, images, out, resume=True)  # the default: auto, so onnxruntime
    assert summary.scored == len(images) - 3
    assert "earlier runs scored with torch, this one with onnxruntime" in caplog.text
    runs = json.loads((out / "_manifest.json").read_text())["runs"]
    assert [r["runtime"] for r in runs] == ["torch", "onnxruntime"]


@pytest.mark.parametrize("missing", ["sha256", "pixel_threshold"])
def test_auto_keeps_torch_for_files_older_than_exports(patchcore_file, tmp_path, missing, caplog):
    """Files written before checksums or pixel thresholds still load on torch; auto must not refuse them."""
    from safetensors.torch import save_file

    from defectscope.io import _META_KEY, read_model_file

    tensors, meta = read_model_file(patchcore_file)
    old = tmp_path / "old.dsmodel"  # written as an older defectscope wrote it: the key absent, no checksum over it
    save_file(
        tensors,
        str(old),
        metadata={_META_KEY: json.dumps({k: v for k, v in meta.items() if k not in (missing, "sha256")})},
    )
    with caplog.at_level(logging.WARNING, logger="defectscope"):
        model = defectscope.load(old, runtime="auto")
    assert model.runtime is None and "older defectscope" in model.runtime_reason
    assert "has no checksum" in caplog.text
