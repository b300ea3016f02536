"""NearestNeighbors (faiss and torch backends; flat, HNSW and IVF indexes) vs numpy brute force."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from defectscope.components.knn import INDEXES, NearestNeighbors, default_nlist
from defectscope.errors import DefectscopeError

BACKENDS = ["faiss", "torch"]


def brute(
    bank: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
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
    with pytest.raises(DefectscopeError, match="flat, hnsw, ivf"):
        NearestNeighbors(bank, index="lsh")
    with pytest.raises(DefectscopeError, match="nprobe"):
        NearestNeighbors(bank, index="ivf", nprobe=0)
    with pytest.raises(DefectscopeError, match="nlist"):
        NearestNeighbors(bank, index="ivf", nlist=0)


def test_faiss_missing_falls_back_to_torch(data, monkeypatch, caplog) -> None:
    bank, queries, _ = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with caplog.at_level(logging.WARNING):
        nn = NearestNeighbors(bank, backend="faiss")
    assert nn.backend == "torch"
    assert "faiss" in caplog.text
    want_d, _ = brute(bank.numpy(), queries.numpy(), 2)
    np.testing.assert_allclose(nn.search(queries, 2)[0].numpy(), want_d, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ approximate indexes
APPROX = ["hnsw", "ivf"]


def clustered(n: int, d: int, n_centres: int, seed: int) -> torch.Tensor:
    """(n, d) points around n_centres Gaussian centres (spread 3, noise 1)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_centres, d, generator=g) * 3.0
    return centres[torch.randint(0, n_centres, (n,), generator=g)] + torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def big() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 6000 x 32 clustered bank, 1000 queries near bank entries, 50 groups."""
    bank = clustered(6000, 32, 60, seed=1)
    g = torch.Generator().manual_seed(2)
    queries = bank[torch.randint(0, 6000, (1000,), generator=g)] + 0.7 * torch.randn(1000, 32, generator=g)
    groups = torch.arange(6000) % 50
    return bank, queries, groups


def true_distances(bank: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
    """float64 ||q - bank[idx]|| for each returned index, (Q, k)."""
    q = queries.double().unsqueeze(1)
    return torch.linalg.vector_norm(q - bank.double()[idx], dim=-1).numpy()


def test_indexes_tuple() -> None:
    assert INDEXES == ("flat", "hnsw", "ivf")
    assert default_nlist(6000) == min(round(4 * 6000**0.5), 6000 // 39) == 153
    assert default_nlist(21402) == 548  # capped by 39 training points per list (4 sqrt(M) = 585)
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(50) == 1 and default_nlist(10) == 0


@pytest.mark.parametrize("index", APPROX)
def test_recall_vs_flat(big, index: str) -> None:
    bank, queries, _ = big
    d_flat, i_flat = NearestNeighbors(bank, index="flat").search(queries, 10)
    nn = NearestNeighbors(bank, index=index)
    assert nn.index == index and nn.backend == "faiss"
    dist, idx = nn.search(queries, 10)
    assert dist.shape == idx.shape == (1000, 10) and dist.dtype == torch.float32 and idx.dtype == torch.int64
    recall_1 = float((idx[:, 0] == i_flat[:, 0]).float().mean())
    recall_10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), i_flat.tolist())])
    # measured with the defaults: 1.000 / 1.000 for both (ivf nprobe=1: 0.919 / 0.729)
    assert recall_1 >= 0.98, recall_1
    assert recall_10 >= 0.97, recall_10
    # approximate neighbours are never closer than the exact ones, and ascending
    assert (dist[:, 0] >= d_flat[:, 0] - 1e-4).all()
    assert (np.diff(dist.numpy(), axis=1) >= 0).all()
    # the distances are the true distances of the entries returned
    np.testing.assert_allclose(dist.numpy(), true_distances(bank, queries, idx), rtol=1e-5, atol=1e-5)


def test_looser_settings_lose_recall(big) -> None:
    """The parameters reach faiss: one probed list / a tiny candidate list find fewer true neighbours."""
    bank, queries, _ = big
    _, i_flat = NearestNeighbors(bank).search(queries, 1)
    _, i_ivf = NearestNeighbors(bank, index="ivf", nprobe=1).search(queries, 1)
    _, i_full = NearestNeighbors(bank, index="ivf", nlist=8, nprobe=8).search(queries, 1)  # every list: exact
    assert float((i_ivf[:, 0] == i_flat[:, 0]).float().mean()) < 0.95
    assert torch.equal(i_full, i_flat)


@pytest.mark.parametrize("index", APPROX)
def test_two_builds_identical(big, index: str) -> None:
    bank, queries, groups = big
    a = NearestNeighbors(bank, index=index, groups=groups)
    b = NearestNeighbors(bank, index=index, groups=groups)
    for kw in ({}, {"exclude_group": 3}):
        da, ia = a.search(queries, 5, **kw)
        db, ib = b.search(queries, 5, **kw)
        assert torch.equal(ia, ib) and torch.equal(da, db)


def test_ivf_seed_changes_partition(big) -> None:
    bank, queries, _ = big
    a = NearestNeighbors(bank, index="ivf", nprobe=1, seed=0).search(queries, 1)[1]
    b = NearestNeighbors(bank, index="ivf", nprobe=1, seed=1).search(queries, 1)[1]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("index", APPROX)
@pytest.mark.parametrize("k", [1, 9])
def test_exclude_group_approximate(big, index: str, k: int) -> None:
    bank, queries, groups = big
    # half the queries are bank entries of group 7: without exclusion they would find themselves
    own = bank[groups == 7][:100]
    queries = torch.cat([queries[:100], own])
    nn = NearestNeighbors(bank, index=index, groups=groups, chunk_size=64)
    dist, idx = nn.search(queries, k, exclude_group=7)
    assert idx.shape == (200, k) and (idx >= 0).all()
    assert not (groups[idx] == 7).any()
    assert (np.diff(dist.numpy(), axis=1) >= 0).all()
    np.testing.assert_allclose(dist.numpy(), true_distances(bank, queries, idx), rtol=1e-5, atol=1e-5)
    mask = (groups == 7).numpy()
    _want_d, want_i = brute(bank.numpy(), queries.numpy(), k, mask)
    assert np.mean(idx.numpy()[:, 0] == want_i[:, 0]) >= 0.95
    assert float(nn.search(queries, 1)[0][100:].max()) < 1e-3  # they do find themselves otherwise


def test_short_rows_are_searched_exactly(caplog) -> None:
    """A query whose probed IVF lists hold only excluded entries still gets k exact neighbours."""
    g = torch.Generator().manual_seed(3)
    near = torch.randn(200, 8, generator=g) * 0.1  # a tight cluster, all of group 0 ...
    far = torch.randn(800, 8, generator=g) * 0.1 + 50.0  # ... far from everything else (group 1)
    bank = torch.cat([near, far])
    groups = torch.cat([torch.zeros(200, dtype=torch.int64), torch.ones(800, dtype=torch.int64)])
    queries = near[:10] + 0.01
    nn = NearestNeighbors(bank, index="ivf", nlist=4, nprobe=1, groups=groups)
    with caplog.at_level(logging.DEBUG, logger="defectscope.components.knn"):
        dist, idx = nn.search(queries, 3, exclude_group=0)
    assert "searched exactly" in caplog.text
    want_d, want_i = brute(bank.numpy(), queries.numpy(), 3, (groups == 0).numpy())
    np.testing.assert_array_equal(idx.numpy(), want_i)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-4, atol=1e-4)


def test_hnsw_ef_search_covers_over_fetch(big) -> None:
    """efSearch below k + n_excluded is raised, so a large excluded group still leaves k results."""
    bank, queries, _ = big
    groups = (torch.arange(6000) < 3000).long()  # group 1 holds half the bank
    nn = NearestNeighbors(bank, index="hnsw", ef_search=4, groups=groups)
    dist, idx = nn.search(queries[:50], 5, exclude_group=1)
    assert (idx >= 0).all() and not (groups[idx] == 1).any()
    assert torch.isfinite(dist).all()


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("index", APPROX)
def test_approximate_index_needs_faiss_backend(data, backend: str, index: str) -> None:
    bank, _, _ = data
    with pytest.raises(DefectscopeError, match="backend='faiss'"):
        NearestNeighbors(bank, backend=backend, index=index)


@pytest.mark.parametrize("index", APPROX)
def test_approximate_without_faiss_falls_back_to_exact_torch(data, monkeypatch, caplog, index: str) -> None:
    bank, queries, _ = data
    monkeypatch.setitem(sys.modules, "faiss", None)
    with caplog.at_level(logging.WARNING):
        nn = NearestNeighbors(bank, index=index)
    assert nn.backend == "torch" and nn.index == "flat"
    assert "faiss" in caplog.text and index in caplog.text
    want_d, _ = brute(bank.numpy(), queries.numpy(), 2)
    np.testing.assert_allclose(nn.search(queries, 2)[0].numpy(), want_d, rtol=1e-4, atol=1e-4)


def test_tiny_banks(data, caplog) -> None:
    bank, queries, groups = data  # 300 entries: at most 300 // 39 = 7 IVF lists
    with caplog.at_level(logging.WARNING):
        nn = NearestNeighbors(bank, index="ivf", nlist=100)
    assert nn.index == "ivf" and nn.nlist == 7 and "nlist=100" in caplog.text
    assert NearestNeighbors(bank, index="ivf").nlist == 7
    assert NearestNeighbors(bank, index="ivf", nprobe=50).nprobe == 7
    # with every list probed IVF is exact
    d, _ = NearestNeighbors(bank, index="ivf", nprobe=7).search(queries, 3)
    want_d, _ = brute(bank.numpy(), queries.numpy(), 3)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-4, atol=1e-4)
    # too small for two lists: exact flat index, logged
    caplog.clear()
    with caplog.at_level(logging.INFO):
        nn = NearestNeighbors(bank[:60], index="ivf", groups=groups[:60])
    assert nn.index == "flat" and "too small" in caplog.text
    d, _ = nn.search(queries, 4, exclude_group=2)
    mask = (groups[:60] == 2).numpy()
    want_d, _ = brute(bank[:60].numpy(), queries.numpy(), 4, mask)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-4, atol=1e-4)
    # HNSW works on any size, down to a handful of entries, and is exact there
    for n in (1, 5, 60):
        d, _i = NearestNeighbors(bank[:n], index="hnsw").search(queries, min(3, n))
        want_d, _want_i = brute(bank[:n].numpy(), queries.numpy(), min(3, n))
        np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-4, atol=1e-4)
