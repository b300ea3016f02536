"""The cached traced extractor: identical scores, a cache hit that never imports timm, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import defectscope
from defectscope.cli.commands import main
from defectscope.features.traced import TracedExtractor, use_cached_extractor
from defectscope.io import load_model_with_extras


@pytest.fixture(scope="module")
def model_path(synthetic_category, tmp_path_factory):
    path = tmp_path_factory.mktemp("traced") / "m.dsmodel"
    assert (
        main(
            [
                "fit",
                str(synthetic_category),
                "-o",
                str(path),
                "--image-size",
                "64",
                "--coreset-ratio",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    return path


def test_traced_extractor_scores_exactly_as_the_built_one(model_path, synthetic_category, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTSCOPE_CACHE", str(tmp_path))
    images = sorted((synthetic_category / "test").rglob("*.png"))[:6]
    monkeypatch.setenv("DEFECTSCOPE_NO_TRACE_CACHE", "1")
    built = defectscope.load(model_path)
    assert not isinstance(built.detector.extractor, TracedExtractor)
    expected = [r.score for r in built.predict(images)]
    monkeypatch.delenv("DEFECTSCOPE_NO_TRACE_CACHE")
    detector, meta, _ = load_model_with_extras(model_path)
    assert use_cached_extractor(detector, meta["weights"]) == "traced"
    detector, meta, _ = load_model_with_extras(model_path)
    assert use_cached_extractor(detector, meta["weights"]) == "cached"
    assert isinstance(detector.extractor, TracedExtractor)
    traced = defectscope.load(model_path)
    assert isinstance(traced.detector.extractor, TracedExtractor)
    assert [r.score for r in traced.predict(images)] == expected


def test_a_cache_hit_starts_without_timm(model_path, synthetic_category, tmp_path):
    image = sorted((synthetic_category / "test").rglob("*.png"))[0]
    code = (
        "import sys, defectscope\nm = defectscope.load(sys.argv[1])\nr = m.predict(sys.argv[2])\n"
        "print(r.score, 'timm' in sys.modules)"
    )
    env = {**__import__("os").environ, "DEFECTSCOPE_CACHE": str(tmp_path)}
    first = subprocess.run(
        [sys.executable, "-c", code, str(model_path), str(image)], capture_output=True, text=True, env=env, timeout=300
    )
    second = subprocess.run(
        [sys.executable, "-c", code, str(model_path), str(image)], capture_output=True, text=True, env=env, timeout=300
    )
    assert first.stdout.split()[1] == "True" and second.stdout.split()[1] == "False", first.stderr + second.stderr
    assert first.stdout.split()[0] == second.stdout.split()[0]


def test_other_weights_or_a_damaged_entry_are_never_used(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTSCOPE_CACHE", str(tmp_path))
    detector, meta, _ = load_model_with_extras(model_path)
    other = json.loads(json.dumps(meta["weights"]))
    other["sha256"] = "0" * 64
    assert use_cached_extractor(detector, other) == "built"  # built weights differ from the record: not cached
    assert not list((tmp_path / "extractors").glob("*.pt")) if (tmp_path / "extractors").exists() else True
    detector, meta, _ = load_model_with_extras(model_path)
    assert use_cached_extractor(detector, meta["weights"]) == "traced"
    for entry in (tmp_path / "extractors").glob("*.pt"):
        entry.write_bytes(b"damaged")
    detector, meta, _ = load_model_with_extras(model_path)
    assert use_cached_extractor(detector, meta["weights"]) == "traced"  # rebuilt, not loaded
