"""Real data: PatchCore with its defaults on MVTec AD bottle (skipped when the data is absent)."""

from __future__ import annotations

import json

import pytest

from defectscope.cli.commands import main

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_patchcore_defaults_on_bottle(bottle, tmp_path):
    model = tmp_path / "bottle.dsmodel"
    assert main(["fit", str(bottle), "-o", str(model), "--no-progress"]) == 0
    out = tmp_path / "bottle.json"
    assert main(["evaluate", str(model), str(bottle), "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["n_good"] == 20 and result["n_defective"] == 63
    assert result["image_auroc"] >= 0.99
    assert result["pixel_auroc"] >= 0.97
