"""iter_batches: order, failures in place, early close, propagated errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import write_bad_images

from defectscope.data import loader
from defectscope.data.images import load_image, preprocess
from defectscope.data.loader import Batch, iter_batches
from defectscope.errors import DefectscopeError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("defectscope-")]


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(11):
        h, w = 20 + i, 30 + 2 * i
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("workers", [1, 3])
def test_batches_keep_order_and_match_direct_preprocessing(images: list[Path], workers: int) -> None:
    batches = list(iter_batches(images, 16, MEAN, STD, batch_size=4, workers=workers))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [p for b in batches for p in b.paths] == images
    assert all(b.failures == [] for b in batches)
    got = torch.cat([b.images for b in batches])
    assert got.shape == (11, 3, 16, 16) and got.dtype == torch.float32
    expected = torch.stack([preprocess(load_image(p), 16, MEAN, STD) for p in images])
    assert torch.equal(got, expected)
    assert [s for b in batches for s in b.sizes] == [(20 + i, 30 + 2 * i) for i in range(11)]
    assert not loader_threads()


def test_failures_reported_in_their_batch(images: list[Path], tmp_path: Path) -> None:
    bad = write_bad_images(tmp_path / "bad")
    paths = [images[0], bad["truncated"], images[1], images[2], bad["empty"], bad["text"], bad["missing"], images[3]]
    batches = list(iter_batches(paths, 8, MEAN, STD, batch_size=3))
    assert len(batches) == 3
    assert batches[0].paths == [images[0], images[1]]
    assert [p for p, _ in batches[0].failures] == [bad["truncated"]]
    assert batches[1].paths == [images[2]]
    assert [p for p, _ in batches[1].failures] == [bad["empty"], bad["text"]]
    assert batches[2].paths == [images[3]] and [p for p, _ in batches[2].failures] == [bad["missing"]]
    for batch in batches:
        assert batch.images.shape[0] == len(batch.paths) == len(batch.sizes)
        for path, message in batch.failures:
            assert message.startswith(str(path)) and "\n" not in message


def test_batch_with_only_failures_is_still_yielded(tmp_path: Path) -> None:
    bad = write_bad_images(tmp_path)
    batches = list(iter_batches([bad["empty"], bad["text"]], 8, MEAN, STD, batch_size=4))
    assert len(batches) == 1
    assert batches[0].images.shape == (0, 3, 8, 8) and batches[0].paths == [] and len(batches[0].failures) == 2


def test_empty_input_yields_nothing() -> None:
    assert list(iter_batches([], 8, MEAN, STD)) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_closing_early_stops_the_thread(images: list[Path], workers: int) -> None:
    gen = iter_batches(images * 20, 8, MEAN, STD, batch_size=2, workers=workers, prefetch=1)
    first = next(gen)
    assert isinstance(first, Batch)
    assert loader_threads()  # decoding ahead in the background
    gen.close()
    deadline = time.monotonic() + 5
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loader_threads()


def test_prefetch_bounds_work_ahead(images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = loader.load_image_noting
    monkeypatch.setattr(loader, "load_image_noting", lambda p: calls.append(p) or real(p))
    gen = iter_batches(images, 8, MEAN, STD, batch_size=1, prefetch=2)
    next(gen)
    time.sleep(0.3)
    # the consumer holds 1 batch, the queue at most 2, the producer at most 1 more in hand
    assert len(calls) <= 4 < len(images)
    gen.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_unexpected_errors_propagate(images: list[Path], monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    real = loader.load_image_noting

    def flaky(path: Path) -> tuple[np.ndarray, list[str]]:
        if path == images[5]:
            raise MemoryError("boom")
        return real(path)

    monkeypatch.setattr(loader, "load_image_noting", flaky)
    got: list[Path] = []
    with pytest.raises(MemoryError, match="boom"):
        for batch in iter_batches(images, 8, MEAN, STD, batch_size=2, workers=workers):
            got.extend(batch.paths)
    assert got == images[:4]
    time.sleep(0.1)
    assert not loader_threads()


def test_bad_arguments() -> None:
    with pytest.raises(DefectscopeError, match="at least 1"):
        list(iter_batches([Path("x.png")], 8, MEAN, STD, batch_size=0))
