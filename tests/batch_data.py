"""The batch tests' data: a small synthetic category (64 px) and a model fitted on it, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import make_mvtec_category

from defectscope.cli.commands import main


def batch_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[Path]]:
    """root, model, images (the test images, sorted), broken (a file that is not an image), category."""
    root = tmp_path_factory.getbasetemp() / "batch-data"
    model = root / "parts.dsmodel"
    if not model.is_file():
        root.mkdir(exist_ok=True)
        make_mvtec_category(root, name="parts", n_train=12, n_test_good=6, n_test_defect=6, size=64, seed=3)
        assert (
            main(
                [
                    "fit",
                    str(root / "parts"),
                    "-o",
                    str(model),
                    "--image-size",
                    "64",
                    "--coreset-ratio",
                    "0.25",
                    "--no-progress",
                ]
            )
            == 0
        )
        (root / "broken.png").write_bytes(b"not a png")
    category = root / "parts"
    return {
        "root": root,
        "model": model,
        "images": sorted((category / "test").rglob("*.png")),
        "broken": root / "broken.png",
        "category": category,
    }
