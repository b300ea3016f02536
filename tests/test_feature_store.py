"""The on-disk feature store PatchCore streams training patches through: exact, bounded, tidy."""

from __future__ import annotations

import tempfile

import pytest
import torch

from defectscope.components.feature_store import FeatureStore
from defectscope.errors import DefectscopeError


def _batches(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 7, generator=gen) for n in (5, 1, 13, 8)]


def test_rows_come_back_bit_exact(tmp_path):
    batches = _batches()
    every = torch.cat(batches)
    with FeatureStore(7, tmp_path) as store:
        for b in batches:
            store.append(b)
        assert len(store) == 27 and store.nbytes == 27 * 7 * 4
        assert torch.equal(store.read(), every)
        assert torch.equal(store.read(4, 19), every[4:19])
        assert store.read(3, 3).shape == (0, 7)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_gather_matches_indexing(tmp_path, block):
    every = torch.cat(_batches(1))
    idx = torch.tensor([0, 2, 3, 9, 10, 11, 20, 26])
    with FeatureStore(7, tmp_path, read_block_rows=block) as store:
        for b in _batches(1):
            store.append(b)
        assert torch.equal(store.gather(idx), every[idx])
        assert store.gather(torch.tensor([], dtype=torch.int64)).shape == (0, 7)


def test_read_runs_matches_slicing(tmp_path):
    every = torch.cat(_batches(2))  # 27 rows
    with FeatureStore(7, tmp_path) as store:
        for b in _batches(2):
            store.append(b)
        starts = [0, 9, 18, 23]  # unordered spacing, overlapping nothing, one run ending at the last row
        got = store.read_runs(starts, 4)
        assert got.shape == (4, 4, 7)
        for r, start in enumerate(starts):
            assert torch.equal(got[r], every[start : start + 4])
        assert torch.equal(store.read_runs([5, 1], 3), torch.stack([every[5:8], every[1:4]]))
        assert store.read_runs([0, 27], 0).shape == (2, 0, 7)
        assert store.read_runs([], 5).shape == (0, 5, 7)
        with pytest.raises(DefectscopeError, match="rows 25:29"):
            store.read_runs([0, 25], 4)
        with pytest.raises(DefectscopeError, match="length"):
            store.read_runs([0], -1)


def test_bad_requests_are_refused(tmp_path):
    with FeatureStore(7, tmp_path) as store:
        store.append(torch.zeros(4, 7))
        with pytest.raises(DefectscopeError, match="rows 2:9"):
            store.read(2, 9)
        with pytest.raises(DefectscopeError, match="ascending"):
            store.gather(torch.tensor([2, 1]))
        with pytest.raises(DefectscopeError, match=r"\[0, 4\)"):
            store.gather(torch.tensor([1, 4]))
        with pytest.raises(DefectscopeError, match="7"):
            store.append(torch.zeros(2, 6))
    with pytest.raises(DefectscopeError, match="closed"):
        store.read()


def test_no_file_is_left_behind(tmp_path):
    store = FeatureStore(3, tmp_path)
    store.append(torch.ones(10, 3))
    assert list(tmp_path.iterdir()) == []  # unlinked at creation: nothing to clean up after a crash
    store.close()
    store.close()


def test_unusable_folder_names_it(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(DefectscopeError, match=r"no/such.*TMPDIR"):
        FeatureStore(3, missing)


def test_patchcore_fit_streams_through_the_store(monkeypatch, tmp_path):
    """Fit leaves nothing in the temporary folder, whether a fold is one chunk or several."""
    from defectscope.detectors import patchcore as patchcore_module
    from defectscope.detectors.patchcore import PatchCore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    images = torch.rand(6, 3, 64, 64)
    det = PatchCore(image_size=64, coreset_ratio=0.2, folds=2).fit(images)
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []  # (torch may add a cache folder here)
    assert det.fit_details_["n_chunks"] == 2
    monkeypatch.setattr(patchcore_module, "CHUNK_PATCHES", 64 * 2)  # two images' patches per chunk
    chunked = PatchCore(image_size=64, coreset_ratio=0.2, folds=2).fit(images)
    assert chunked.fit_details_["n_chunks"] == 4
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []


def test_padim_fit_streams_through_the_store(monkeypatch, tmp_path):
    """PaDiM's embeddings go through the store: nothing left behind, chunked statistics equal one chunk."""
    from defectscope.detectors import padim as padim_module
    from defectscope.detectors.padim import PaDiM

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    images = torch.rand(10, 3, 64, 64)  # more images than dimensions: well-conditioned covariances
    whole = PaDiM(image_size=64, d_reduced=6).fit(images)
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []
    # a scratch budget of a few positions makes fit read many short runs from every image
    monkeypatch.setattr(padim_module, "_WORK_BYTES", 3 * padim_module.fit_scratch_bytes(10, 1, 6))
    chunked = PaDiM(image_size=64, d_reduced=6).fit(iter([images[:3], images[3:]]))
    torch.testing.assert_close(chunked.mean_, whole.mean_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.inv_cov_, whole.inv_cov_, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.training_scores_, whole.training_scores_, rtol=1e-4, atol=0)


@pytest.mark.parametrize("background", [True, False])
def test_background_and_inline_writes_store_the_same(tmp_path, background):
    batches = _batches(3)
    with FeatureStore(7, tmp_path, background=background, max_pending=1) as store:
        for b in batches:
            store.append(b)
            b.fill_(-1.0)  # the caller may reuse its tensor at once: append copied it
        assert torch.equal(store.read(), torch.cat(_batches(3)))
        store.append(torch.ones(2, 7))  # appending after a read keeps going at the end
        assert torch.equal(store.read(27, 29), torch.ones(2, 7))


def _fail_writes(monkeypatch, after_calls: int) -> None:
    """Make os.pwrite fail with 'No space left on device' after ``after_calls`` successful calls."""
    import errno
    import os

    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("background", [True, False])
def test_failed_write_is_raised_with_the_folder_and_what_to_do(tmp_path, monkeypatch, background):
    _fail_writes(monkeypatch, after_calls=1)
    store = FeatureStore(7, tmp_path, background=background)
    store.append(torch.zeros(4, 7))
    with pytest.raises(DefectscopeError, match=rf"{tmp_path}.*No space left.*TMPDIR") as caught:
        store.append(torch.zeros(4, 7))
        store.flush()  # background: the failure surfaces here at the latest
    assert "4 of 8 rows written" in str(caught.value)
    with pytest.raises(DefectscopeError, match="No space left"):  # and keeps surfacing: no silent loss
        store.read()
    store.close()


def test_writer_keeps_draining_after_a_failure(tmp_path, monkeypatch):
    """A failed write must not leave append blocked on a full queue."""
    _fail_writes(monkeypatch, after_calls=0)
    store = FeatureStore(7, tmp_path, max_pending=1)
    with pytest.raises(DefectscopeError, match="No space left"):
        for _ in range(50):
            store.append(torch.zeros(100, 7))
        store.flush()
    store.close()
    assert store._writer is None


def test_close_with_pending_writes_stops_the_writer(tmp_path):
    store = FeatureStore(7, tmp_path, max_pending=2)
    for _ in range(5):
        store.append(torch.zeros(1000, 7))
    writer = store._writer
    store.close()
    assert writer is not None and not writer.is_alive()
    with pytest.raises(DefectscopeError, match="closed"):
        store.append(torch.zeros(1, 7))
