"""Exported models (issue #16): the graph agrees with the torch model, runs without torch, and refuses
what it cannot do with a message a person can act on. Small models on the synthetic category; the
real-data parity checks are in test_export_real.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnx")

import defectscope
from defectscope.cli.commands import main
from defectscope.data.images import load_image, preprocess
from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.export import EXPORT_FILE
from defectscope.export.exporter import MAP_TOL, SCORE_RTOL, export_model
from defectscope.export.preprocess import resize_unit
from defectscope.io import update_metadata

#: a Python prelude under which any import of torch (or what needs it) fails
NO_TORCH = """
import sys, importlib.abc
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'timm', 'faiss'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, _Blocked())
"""


def _images(category: Path, n: int = 8) -> list[Path]:
    test = sorted((category / "test").rglob("*.png"))
    return test[:: max(1, len(test) // n)][:n]


def assert_agree(reference: list, exported: list) -> None:
    """Issue #16's parity: scores within 1e-4 relative, maps within 1e-3 of the map's range, same judgements."""
    assert len(reference) == len(exported)
    for a, b in zip(reference, exported):
        assert a.ok and b.ok, (a.error, b.error)
        assert b.score == pytest.approx(a.score, rel=SCORE_RTOL), a.name
        assert a.judgement == b.judgement, a.name
        spread = float(np.ptp(a.anomaly_map))
        assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) <= MAP_TOL * spread, a.name


@pytest.fixture(scope="module")
def models(synthetic_category, tmp_path_factory):
    """Small PatchCore (bank re-weighting on, layers weighted equally, target_dim pooling) and PaDiM model files."""
    root = tmp_path_factory.mktemp("export-models")
    train = synthetic_category / "train" / "good"
    out = {}
    for method, params in (
        ("patchcore", {"coreset_ratio": 0.25, "layer_weighting": "equal", "target_dim": 100}),
        ("padim", {}),
    ):
        model = defectscope.fit(train, method=method, image_size=64, **params)
        out[method] = model.save(root / f"{method}.dsmodel")
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    for method, path in models.items():
        for fmt in ("onnx", "openvino"):
            folders[method, fmt] = root / f"{method}-{fmt}"
            export_model(path, folders[method, fmt], fmt)
    return folders


@pytest.fixture(scope="module")
def reference(models, synthetic_category):
    """The torch model files' results on the test images, per method."""
    return {method: defectscope.load(path).predict(_images(synthetic_category)) for method, path in models.items()}


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("method", ["patchcore", "padim"])
@pytest.mark.parametrize("fmt,runtime", [("onnx", "onnxruntime"), ("onnx", "openvino"), ("openvino", "openvino")])
def test_exported_scores_and_maps_agree_with_torch(reference, exported, synthetic_category, method, fmt, runtime):
    model = defectscope.load(exported[method, fmt], runtime=runtime)
    assert model.detector.runtime == runtime
    assert_agree(reference[method], model.predict(_images(synthetic_category)))


def test_export_records_metadata_and_its_agreement(models, exported):
    source = defectscope.load(models["patchcore"])
    meta = json.loads((exported["patchcore", "onnx"] / EXPORT_FILE).read_text())
    for key in ("threshold", "pixel_threshold", "image_size", "normalization", "method", "backbone", "layers"):
        assert meta[key] == source.meta[key], key
    assert meta["sha256"] == source.checksum  # the model file's checksum travels with the export
    agreement = meta["export"]["agreement"]
    assert agreement["within"] and agreement["judgements_equal"] and agreement["n_images"] == 4
    assert agreement["max_score_rel"] <= SCORE_RTOL and agreement["max_map_diff"] <= MAP_TOL
    assert sorted(p.name for p in exported["padim", "openvino"].iterdir()) == [EXPORT_FILE, "model.bin", "model.xml"]
    info = defectscope.load(exported["patchcore", "onnx"]).info()
    assert info["checksum"] == source.checksum and info["image_size"] == 64 and info["method"] == "patchcore"
    assert info["layer_weighting"] == "equal"  # read from the file's parameters: the runtime has no detector
    assert defectscope.load(exported["padim", "openvino"]).info()["layer_weighting"] is None


def test_resize_outside_the_graph_matches_torch():
    rng = np.random.default_rng(1)
    for h, w, size in ((300, 211, 64), (64, 64, 64), (40, 57, 64), (513, 700, 224)):  # down, same, up, odd
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        reference = preprocess(image, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).numpy()
        assert np.abs(resize_unit(image, size) - reference).max() < 2e-5, (h, w, size)


def test_a_model_file_on_a_runtime_is_exported_once_into_the_cache(
    models, reference, synthetic_category, tmp_path, monkeypatch
):
    monkeypatch.setenv("DEFECTSCOPE_CACHE", str(tmp_path))
    model = defectscope.load(models["patchcore"], runtime="openvino")
    folder = Path(model.detector.folder)
    assert model.detector.runtime == "openvino" and folder.parent == tmp_path / "exports"
    # the model keeps its file (a reload re-exports it when it changes) and says what it runs on
    assert model.path == Path(models["patchcore"]) and model.runtime == "openvino"
    assert model.info()["runtime"] == "openvino"
    assert_agree(reference["patchcore"], model.predict(_images(synthetic_category)))
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    again = defectscope.load(models["patchcore"], runtime="onnxruntime")
    assert Path(again.detector.folder) == folder  # reused
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp
    (folder / "model.onnx").unlink()  # a damaged cache entry is made again, not a dead end
    repaired = defectscope.load(models["patchcore"], runtime="onnxruntime")
    assert (Path(repaired.detector.folder) / "model.onnx").is_file()
    assert_agree(reference["patchcore"], repaired.predict(_images(synthetic_category)))


def test_batches_of_any_size_give_the_same_scores(exported, synthetic_category):
    model = defectscope.load(exported["patchcore", "onnx"])
    images = _images(synthetic_category, 5)
    one_by_one = [model.predict(p).score for p in images]
    together = [r.score for r in model.predict(images, batch_size=4)]
    assert together == pytest.approx(one_by_one, rel=1e-6)
    arrays = [load_image(p) for p in images[:2]]  # in-memory images go the same way
    assert [r.score for r in model.predict(arrays)] == pytest.approx(one_by_one[:2], rel=1e-6)


# --------------------------------------------------------------------------- without torch
def test_load_predict_and_cli_run_where_torch_cannot_be_imported(exported, synthetic_category, tmp_path):
    folder = exported["patchcore", "onnx"]
    images = [str(p) for p in _images(synthetic_category, 3)]
    expected = [r.score for r in defectscope.load(folder).predict(images)]
    code = NO_TORCH + (
        "import json, defectscope\n"
        "from defectscope.cli.commands import main\n"
        "results = defectscope.load(sys.argv[1]).predict(sys.argv[3:])\n"
        "print(json.dumps([r.score for r in results]))\n"
        "assert results[0].overlay().ndim == 3 and results[0].anomaly_map is not None\n"
        "code = main(['predict', sys.argv[1], '--heatmaps', sys.argv[2], *sys.argv[3:]])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "heat"), *images],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert json.loads(lines[0]) == pytest.approx(expected, rel=1e-6)
    assert [line.split(",")[0] for line in lines[1:]] == images
    assert len(list((tmp_path / "heat").glob("*.png"))) == 3


def test_a_missing_runtime_says_what_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(DefectscopeError, match=r"pip install 'defectscope\[export\]'"):
        defectscope.load(exported["patchcore", "onnx"])
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(DefectscopeError, match=r"pip install 'defectscope\[export\]'"):
        defectscope.load(exported["padim", "openvino"])


# --------------------------------------------------------------------------- refusals
def test_export_refuses_a_non_empty_folder_and_an_export(models, exported, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DefectscopeError, match="not empty"):
        export_model(models["patchcore"], target)
    assert (target / "notes.txt").read_text() == "keep me"
    with pytest.raises(DefectscopeError, match="already an exported model"):
        export_model(exported["patchcore", "onnx"], tmp_path / "again")
    with pytest.raises(DefectscopeError, match="unknown export format"):
        export_model(models["patchcore"], tmp_path / "x", "tflite")
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_export_refuses_older_model_files_spade_and_aligned_models(models, synthetic_category, tmp_path):
    old = tmp_path / "old.dsmodel"
    old.write_bytes(models["patchcore"].read_bytes())
    from defectscope.io import read_model_file, write_model_file

    tensors, meta = read_model_file(old)
    del meta["pixel_threshold"]  # what a model fitted before the pixel threshold existed holds
    write_model_file(old, tensors, meta)
    with pytest.raises(ModelFileError, match="older defectscope.*fit the model again"):
        export_model(old, tmp_path / "old-export")

    spade = defectscope.fit(synthetic_category / "train" / "good", method="spade", image_size=64)
    spade_path = spade.save(tmp_path / "spade.dsmodel")
    with pytest.raises(DefectscopeError, match="SPADE models cannot be exported: SPADE's pixel search"):
        export_model(spade_path, tmp_path / "spade-export")

    aligned = tmp_path / "aligned.dsmodel"
    aligned.write_bytes(models["patchcore"].read_bytes())
    update_metadata(aligned, {"align": {"mode": "rot90"}})
    with pytest.raises(DefectscopeError, match="--align cannot be exported"):
        export_model(aligned, tmp_path / "aligned-export")
    assert not any(p.name.endswith("export") for p in tmp_path.iterdir())


def test_a_damaged_or_edited_export_is_refused(exported, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(exported["patchcore", "onnx"], edited)
    meta = json.loads((edited / EXPORT_FILE).read_text())
    meta["threshold"] = 1e9
    (edited / EXPORT_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="edited by hand"):
        defectscope.load(edited)
    damaged = tmp_path / "damaged"
    shutil.copytree(exported["patchcore", "onnx"], damaged)
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (damaged / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="model.onnx: damaged"):
        defectscope.load(damaged)
    with pytest.raises(ModelFileError, match="not an exported model"):
        defectscope.load(tmp_path)
    with pytest.raises(DefectscopeError, match="OpenVINO export runs on openvino only"):
        defectscope.load(exported["padim", "openvino"], runtime="onnxruntime")
    with pytest.raises(DefectscopeError, match="exported models are scored without alignment"):
        defectscope.load(exported["padim", "onnx"], align="rigid")


# --------------------------------------------------------------------------- command line
def test_cli_export_then_predict(models, synthetic_category, tmp_path, capsys):
    folder = tmp_path / "cli-export"
    assert (
        main(
            [
                "export",
                str(models["padim"]),
                "--format",
                "onnx",
                "-o",
                str(folder),
                "--check",
                *map(str, _images(synthetic_category, 2)),
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert f"wrote {folder}: padim as onnx" in said and "on 2 given images" in said and "judgements equal" in said
    assert main(["export", str(models["padim"]), "-o", str(folder)]) == 2
    assert "not empty" in capsys.readouterr().err
    image = _images(synthetic_category, 1)[0]
    assert main(["predict", str(folder), str(image), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["score"] == pytest.approx(defectscope.load(models["padim"]).predict(image).score, rel=SCORE_RTOL)
