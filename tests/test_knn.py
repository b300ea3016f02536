"""NearestNeighbors (faiss and torch backends) vs numpy brute force."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from defectscope.components.knn import NearestNeighbors
from defectscope.errors import DefectscopeError

BACKENDS = ["faiss", "torch"]


def brute(bank: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None, :, :]) ** 2).sum(-1))
    if mask is not None:
        d[:, mask] = np.inf
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def no_tie_rows(bank: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Rows whose k+1 smallest distances are clearly separated (indices then well defined)."""
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None, :, :]) ** 2).sum(-1))
    if mask is not None:
        d[:, mask] = np.inf
    s = np.sort(d, axis=1)[:, : k + 1]
    return (np.diff(s, axis=1) > 1e-4).all(axis=1)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=g)
    queries = torch.randn(103, 16, generator=g) + 0.1
    groups = torch.arange(300) % 7
    return bank, queries, groups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk", [10, 4096])
def test_search_vs_brute_force(data, backend: str, k: int, chunk: int) -> None:
    bank, queries, _ = data
    nn = NearestNeighbors(bank, backend=backend, chunk_size=chunk)
    assert nn.backend == backend
    dist, idx = nn.search(queries, k)
    assert dist.shape == (103, k) and dist.dtype == torch.float32
    assert idx.shape == (103, k) and idx.dtype == torch.int64
    want_d, want_i = brute(bank.numpy(), queries.numpy(), k)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-4, atol=1e-4)
    rows = no_tie_rows(bank.numpy(), queries.numpy(), k)
    assert rows.sum() > 90
    np.testing.assert_array_equal(idx.numpy()[rows], want_i[rows])
    assert (np.diff(dist.numpy(), axis=1) >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_in_bank_have_zero_distance(data, backend: str) -> None:
    bank, _, _ = data
    dist, idx = NearestNeighbors(bank, backend=backend, chunk_size=64).search(bank[:100], 1)
    assert idx[:, 0].tolist() == list(range(100))
    assert float(dist.max()) < 1e-2 and float(dist.min()) >= 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("group", [0, 4])
def test_exclusion_vs_masked_brute_force(data, backend: str, k: int, group: int) -> None:
    bank, queries, groups = data
    # queries drawn from the bank's own group: without exclusion they would find themselves
    queries = torch.cat([queries[:20], bank[groups == group][:15]])
    nn = NearestNeighbors(bank, backend=backend, chunk_size=8, groups=groups)
    dist, idx = nn.search(queries, k, exclude_group=group)
    mask = (groups == group).numpy()
    want_d, want_i = brute(bank.numpy(), queries.numpy(), k, mask)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-4, atol=1e-4)
    rows = no_tie_rows(bank.numpy(), queries.numpy(), k, mask)
    np.testing.assert_array_equal(idx.numpy()[rows], want_i[rows])
    assert not (groups[idx] == group).any()
    d2, i2 = nn.search_excluding(queries, k, group)
    assert torch.equal(d2, dist) and torch.equal(i2, idx)
    # without exclusion the in-bank queries find themselves at distance ~0
    d0, _ = nn.search(queries, k)
    assert float(d0[20:, 0].max()) < 1e-2 < float(dist[20:, 0].min())


def test_backends_agree(data) -> None:
    bank, queries, groups = data
    a = NearestNeighbors(bank, "faiss", groups=groups).search(queries, 4, exclude_group=2)
    b = NearestNeighbors(bank, "torch", groups=groups).search(queries, 4, exclude_group=2)
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(data, backend: str) -> None:
    bank, queries, groups = data
    nn = NearestNeighbors(bank, backend=backend, groups=groups)
    with pytest.raises(DefectscopeError):
        nn.search(queries, 301)
    with pytest.raises(DefectscopeError):
        nn.search(queries, 0)
    with pytest.raises(DefectscopeError):
        nn.search(queries[:, :5], 1)
    n_usable = int((groups != 0).sum())
    with pytest.raises(DefectscopeError):
        nn.search(queries, n_usable + 1, exclude_group=0)
    assert nn.search(queries, n_usable, exclude_group=0)[1].shape == (103, n_usable)
    with pytest.raises(DefectscopeError):
        NearestNeighbors(bank, backend=backend).search(queries, 1, exclude_group=0)
    d, i = nn.search(queries[:0], 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)


def test_bad_construction(data) -> None:
    bank, _, _ = data
    with pytest.raises(DefectscopeError, match="faiss, torch"):
        NearestNeighbors(bank, backend="annoy")
    with pytest.raises(DefectscopeError):
        NearestNeighbors(bank[:0])
    with pytest.raises(DefectscopeError):
        NearestNeighbors(bank, groups=torch.zeros(5, dtype=torch.int64))


def test_faiss_missing_falls_back_to_torch(data, monkeypatch, caplog) -> None:
    bank, queries, _ = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with caplog.at_level(logging.WARNING):
        nn = NearestNeighbors(bank, backend="faiss")
    assert nn.backend == "torch"
    assert "faiss" in caplog.text
    want_d, _ = brute(bank.numpy(), queries.numpy(), 2)
    np.testing.assert_allclose(nn.search(queries, 2)[0].numpy(), want_d, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_block", [300 * 7, 1 << 25])
def test_search_excluding_own_vs_masked_brute_force(data, backend: str, max_block: int) -> None:
    bank, queries, groups = data
    query_groups = torch.arange(queries.shape[0]) % 7
    nn = NearestNeighbors(bank, backend=backend, groups=groups)
    dist, idx = nn.search_excluding_own(queries, query_groups, max_block=max_block)
    assert dist.shape == idx.shape == (queries.shape[0],)
    for q in range(queries.shape[0]):
        mask = (groups == query_groups[q]).numpy()
        want_d, want_i = brute(bank.numpy(), queries[q : q + 1].numpy(), 1, mask)
        assert dist[q] == pytest.approx(float(want_d[0, 0]), rel=1e-4, abs=1e-4)
        assert groups[idx[q]] != query_groups[q]
        if no_tie_rows(bank.numpy(), queries[q : q + 1].numpy(), 1, mask)[0]:
            assert int(idx[q]) == int(want_i[0, 0])
    # a query whose group owns the whole bank has nothing left to match
    with pytest.raises(DefectscopeError):
        NearestNeighbors(bank, groups=torch.zeros(300, dtype=torch.int64)).search_excluding_own(
            queries[:2], torch.zeros(2, dtype=torch.int64)
        )
