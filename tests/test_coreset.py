"""Greedy k-center coreset vs a plain numpy reference; JL dimension and projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.random_projection import johnson_lindenstrauss_min_dim

from defectscope.components.coreset import coverage_radius, greedy_coreset, jl_dim, random_projection
from defectscope.errors import DefectscopeError


def naive_k_center(x: np.ndarray, n_select: int, start: int) -> list[int]:
    """O(N^2 k) greedy k-center: add the point whose nearest chosen centre is farthest."""
    chosen = [start]
    while len(chosen) < n_select:
        best, best_d = -1, -1.0
        for i in range(len(x)):
            if i in chosen:
                continue
            d = min(float(np.sqrt(((x[i] - x[c]) ** 2).sum())) for c in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def start_index(n: int, seed: int) -> int:
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


@pytest.fixture
def features() -> torch.Tensor:
    return torch.randn(120, 24, generator=torch.Generator().manual_seed(3))


def test_matches_naive_without_projection(features: torch.Tensor) -> None:
    got = greedy_coreset(features, 15, eps=None, seed=5)
    want = naive_k_center(features.double().numpy(), 15, start_index(len(features), 5))
    assert got.dtype == torch.int64
    assert got.tolist() == want


def test_large_jl_dim_means_no_projection(features: torch.Tensor) -> None:
    # jl_dim(120, 0.9) > 24 dims, so the default eps must leave the features as they are
    assert jl_dim(120, 0.9) >= features.shape[1]
    assert greedy_coreset(features, 10, seed=1).tolist() == greedy_coreset(features, 10, eps=None, seed=1).tolist()


def test_matches_naive_on_projected_features(features: torch.Tensor) -> None:
    got = greedy_coreset(features, 12, projection_dim=8, seed=2)
    projected = random_projection(features, 8, seed=2)
    assert projected.shape == (120, 8)
    want = naive_k_center(projected.double().numpy(), 12, start_index(len(features), 2))
    assert got.tolist() == want
    # and it differs from the selection in the original space
    assert got.tolist() != greedy_coreset(features, 12, eps=None, seed=2).tolist()


def test_n_select_at_least_n_returns_all(features: torch.Tensor) -> None:
    assert greedy_coreset(features, 120).tolist() == list(range(120))
    assert greedy_coreset(features, 500).tolist() == list(range(120))


def test_duplicates_give_distinct_indices() -> None:
    x = torch.ones(50, 4) * 3.0
    got = greedy_coreset(x, 20, eps=None, seed=0)
    assert len(set(got.tolist())) == 20
    assert got.tolist() == greedy_coreset(x, 20, eps=None, seed=0).tolist()
    # three distinct values repeated: the first three centres cover all three values
    y = torch.tensor([[0.0], [10.0], [20.0]]).repeat(30, 1)
    got = greedy_coreset(y, 10, eps=None, seed=4)
    assert len(set(got.tolist())) == 10
    assert sorted(y[got[:3], 0].tolist()) == [0.0, 10.0, 20.0]


def test_seed_determinism_and_start(features: torch.Tensor) -> None:
    a = greedy_coreset(features, 10, seed=7)
    assert a.tolist() == greedy_coreset(features, 10, seed=7).tolist()
    b = greedy_coreset(features, 10, seed=8)
    assert int(a[0]) == start_index(120, 7) and int(b[0]) == start_index(120, 8)
    assert int(a[0]) != int(b[0])


@pytest.mark.parametrize(
    "x, n",
    [
        (torch.zeros(0, 4), 3),
        (torch.randn(10, 4), 0),
        (torch.randn(10, 4), -2),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1),
        (torch.randn(10), 3),
    ],
)
def test_bad_inputs_raise(x: torch.Tensor, n: int) -> None:
    with pytest.raises(DefectscopeError):
        greedy_coreset(x, n)


def test_coverage_radius_vs_brute_force(features: torch.Tensor) -> None:
    idx = greedy_coreset(features, 9, eps=None, seed=0)
    x = features.double().numpy()
    d = np.sqrt(((x[:, None, :] - x[None, idx.numpy(), :]) ** 2).sum(-1))
    want = d.min(axis=1).max()
    assert coverage_radius(features, idx, chunk_size=7) == pytest.approx(want, rel=1e-5)
    assert coverage_radius(features, features[idx]) == pytest.approx(want, rel=1e-5)
    # the radius of the first k greedy centres is the distance of the (k+1)-th pick to them
    nxt = greedy_coreset(features, 10, eps=None, seed=0)
    assert nxt[:9].tolist() == idx.tolist()
    assert coverage_radius(features, idx) == pytest.approx(d[int(nxt[9])].min(), rel=1e-5)
    assert coverage_radius(features, torch.arange(120)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("n", [2, 10, 1000, 214_000])
@pytest.mark.parametrize("eps", [0.1, 0.5, 0.9])
def test_jl_dim_matches_sklearn(n: int, eps: float) -> None:
    assert jl_dim(n, eps) == int(johnson_lindenstrauss_min_dim(n, eps=eps))


def test_random_projection_preserves_distances() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2000, generator=g)
    eps = 0.5
    dim = jl_dim(40, eps)
    y = random_projection(x, dim, seed=1)
    assert y.shape == (40, dim) and y.dtype == torch.float32
    iu = np.triu_indices(40, 1)
    dx = torch.cdist(x.double(), x.double()).numpy()[iu] ** 2
    dy = torch.cdist(y.double(), y.double()).numpy()[iu] ** 2
    ratio = dy / dx
    assert ratio.min() > 1 - eps and ratio.max() < 1 + eps
    assert abs(ratio.mean() - 1.0) < 0.05
    # seeded, and dim >= D leaves the features alone
    assert torch.equal(y, random_projection(x, dim, seed=1))
    assert not torch.equal(y, random_projection(x, dim, seed=2))
    assert torch.equal(random_projection(x, 2000, seed=0), x)


# ----------------------------------------------------------------- engines
def _clustered(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d, generator=g) * 4.0
    return centres[torch.randint(12, (n,), generator=g)] + torch.randn(n, d, generator=g) * 0.5


def greedy_float64(x: torch.Tensor, k: int, start: int) -> list[int]:
    """Vectorised greedy k-center with distances in float64 (direct differences, no expansion)."""
    xd = x.double()
    min_d = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    chosen = [start]
    for _ in range(k - 1):
        min_d = torch.minimum(min_d, ((xd - xd[chosen[-1]]) ** 2).sum(dim=1))
        min_d[chosen] = -1.0
        chosen.append(int(torch.argmax(min_d)))
    return chosen


@pytest.mark.parametrize("n, d, k", [(120, 24, 15), (2000, 16, 300), (600, 3, 599)])
def test_pruned_engine_matches_brute_index_for_index(n: int, d: int, k: int) -> None:
    pytest.importorskip("numba")
    from defectscope.components.coreset import kcenter

    x = _clustered(n, d, seed=n)
    pruned = kcenter(x, k, eps=None, seed=1, engine="pruned")
    brute = kcenter(x, k, eps=None, seed=1, engine="brute")
    want = greedy_float64(x, k, start_index(n, 1))
    assert pruned.indices.tolist() == want
    # the brute engine (float32 matrix expansion) may only part from it at a float near-tie
    got = brute.indices.tolist()
    if got != want:
        i = next(j for j in range(k) if got[j] != want[j])
        gap = torch.cdist(x.double()[[got[i], want[i]]], x.double()[want[:i]]).min(dim=1).values
        assert abs(float(gap[0] - gap[1])) <= 1e-5 * float(gap[1])
    # every point's nearest centre and squared distance, against a float64 brute force
    xd = x.double()
    d2 = torch.cdist(xd, xd[pruned.indices]) ** 2
    assert torch.allclose(pruned.sq_dist.double(), d2.min(dim=1).values, rtol=1e-4, atol=1e-4)
    assert torch.allclose(
        d2.gather(1, pruned.nearest.unsqueeze(1)).squeeze(1), d2.min(dim=1).values, rtol=1e-4, atol=1e-4
    )
    assert torch.allclose(brute.sq_dist.double(), d2.min(dim=1).values, rtol=1e-3, atol=1e-3)
    if k <= 15:
        assert pruned.indices.tolist() == naive_k_center(xd.numpy(), k, start_index(n, 1))


@pytest.mark.parametrize("n, d, k", [(120, 24, 15), (2000, 16, 300), (3000, 40, 1200), (600, 3, 599)])
@pytest.mark.parametrize("pool_size", [8, 512])
def test_batched_engine_matches_the_one_at_a_time_greedy(n: int, d: int, k: int, pool_size: int) -> None:
    """Several centres per pass, yet the same centres in the same order as the float64 greedy
    (a difference allowed only at a float near-tie), and every point's nearest centre and distance."""
    from defectscope.components.coreset import _batched, _Closing

    x = _clustered(n, d, seed=n + 1)
    start = start_index(n, 1)
    got, nearest, sq_dist = _batched(x, k, start, _Closing(None, close=False), pool_size=pool_size)
    want = greedy_float64(x, k, start)
    if got.tolist() != want:
        i = next(j for j in range(k) if got[j] != want[j])
        gap = torch.cdist(x.double()[[int(got[i]), want[i]]], x.double()[want[:i]]).min(dim=1).values
        assert abs(float(gap[0] - gap[1])) <= 1e-4 * float(gap[1]) + 1e-6
    assert len(set(got.tolist())) == k
    xd = x.double()
    d2 = torch.cdist(xd, xd[got]) ** 2
    assert torch.allclose(sq_dist.double(), d2.min(dim=1).values, rtol=1e-3, atol=1e-3)
    assert torch.allclose(d2.gather(1, nearest.unsqueeze(1)).squeeze(1), d2.min(dim=1).values, rtol=1e-3, atol=1e-3)
    assert kcenter_default_is_batched(x, k)


def kcenter_default_is_batched(x: torch.Tensor, k: int) -> bool:
    from defectscope.components.coreset import kcenter

    return (
        kcenter(x, k, eps=None, seed=1).indices.tolist()
        == kcenter(x, k, eps=None, seed=1, engine="batched").indices.tolist()
    )


def test_batched_engine_duplicates_and_shared_bar() -> None:
    from defectscope.components.coreset import kcenter

    class Count:
        n = 0

        def update(self, k: int = 1) -> None:
            self.n += k

    y = torch.tensor([[0.0], [10.0], [20.0]]).repeat(30, 1)
    bar = Count()
    got = kcenter(y, 10, eps=None, seed=4, bar=bar).indices
    assert len(set(got.tolist())) == 10 and bar.n == 10
    assert sorted({float(y[i]) for i in got[:3]}) == [0.0, 10.0, 20.0]  # the three distinct values first


def test_pruned_engine_duplicates() -> None:
    pytest.importorskip("numba")
    y = torch.tensor([[0.0], [10.0], [20.0]]).repeat(30, 1)
    got = greedy_coreset(y, 10, eps=None, seed=4, engine="pruned")
    assert got.tolist() == greedy_coreset(y, 10, eps=None, seed=4, engine="brute").tolist()
    assert len(set(got.tolist())) == 10


def test_unknown_engine_raises(features: torch.Tensor) -> None:
    with pytest.raises(DefectscopeError, match="engine"):
        greedy_coreset(features, 3, engine="fast")


@pytest.mark.parametrize("row", [0, 6, 9])
def test_finiteness_check_sees_every_block(row):
    from defectscope.components.coreset import _all_finite

    x = torch.zeros(10, 3)
    assert _all_finite(x, rows=4)
    x[row, 1] = float("inf") if row % 2 else float("nan")
    assert not _all_finite(x, rows=4)
