"""Issue #16's parity test on real images: MVTec AD bottle and pill test images scored by the model file
(torch) and by its export (onnxruntime and OpenVINO) give scores within 1e-4 relative, maps within
1e-3 of the map's range and identical judgements.

Small but real models (lite0 weights, 16 training images, 128 px PatchCore, 96 px PaDiM) on two test
images per defect type, so the check stays within a minute or two on two cores."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnx")

from test_export import assert_agree

import defectscope
from defectscope.export.exporter import export_model

pytestmark = [pytest.mark.real, pytest.mark.slow]

N_TRAIN = 16
PER_DEFECT_TYPE = 2


def _test_images(category: Path) -> list[Path]:
    images: list[Path] = []
    for folder in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
        images += sorted(folder.glob("*.png"))[:PER_DEFECT_TYPE]
    return images


@pytest.fixture(scope="module", params=["bottle", "pill"])
def category(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize(
    "method,params,fmt",
    [
        ("patchcore", {"image_size": 128, "coreset_ratio": 0.1}, "onnx"),
        ("padim", {"image_size": 96}, "openvino"),
    ],
)
def test_export_agrees_with_torch_on_real_images(category, method, params, fmt, tmp_path):
    train = sorted((category / "train" / "good").glob("*.png"))[:N_TRAIN]
    model = defectscope.fit(train, method=method, **params)
    path = model.save(tmp_path / f"{category.name}.dsmodel")
    meta = export_model(path, tmp_path / "export", fmt)
    assert meta["export"]["agreement"]["within"], meta["export"]["agreement"]
    images = _test_images(category)
    reference = model.predict(images)
    assert {r.judgement for r in reference} == {0, 1}  # both verdicts occur, so judgements are really compared
    runtimes = ["onnxruntime", "openvino"] if fmt == "onnx" else ["openvino"]
    for runtime in runtimes:
        assert_agree(reference, defectscope.load(tmp_path / "export", runtime=runtime).predict(images))
