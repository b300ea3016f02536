"""Per-position Gaussians vs numpy/scipy references: covariance, inverse, Mahalanobis, leave-one-out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from defectscope.components.gaussian import (
    GaussianAccumulator,
    _inverse_cholesky,
    accumulator_bytes,
    fit_gaussians,
    loo_mahalanobis,
    mahalanobis,
    regularized_inverse,
)
from defectscope.errors import DefectscopeError

EPS = 0.01


def samples(n: int = 12, p: int = 5, d: int = 4, seed: int = 0) -> torch.Tensor:
    """(n, p, d) float64 correlated samples with a different mean per position."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(p, d, d))
    x = np.einsum("pij,npj->npi", mix, rng.normal(size=(n, p, d))) + rng.normal(size=(p, d)) * 3
    return torch.from_numpy(x)


def test_streaming_covariance_matches_np_cov_unbiased() -> None:
    x = samples()
    acc = GaussianAccumulator(5, 4)
    for part in x.split(5):  # batches of 5, 5, 2
        acc.update(part)
    assert acc.n == 12
    np.testing.assert_allclose(acc.mean().numpy(), x.numpy().mean(axis=0), rtol=1e-12)
    for pos in range(5):
        ref = np.cov(x[:, pos].numpy(), rowvar=False)  # bias=False: divides by N - 1
        np.testing.assert_allclose(acc.covariance()[pos].numpy(), ref, rtol=1e-10, atol=1e-12)
    biased = np.cov(x[:, 0].numpy(), rowvar=False, bias=True)
    assert not np.allclose(acc.covariance()[0].numpy(), biased)


def test_accumulator_rejects_wrong_shape_and_too_few_samples() -> None:
    acc = GaussianAccumulator(5, 4)
    with pytest.raises(DefectscopeError, match=r"\(B, 5, 4\)"):
        acc.update(torch.zeros(2, 5, 3))
    acc.update(torch.zeros(1, 5, 4))
    with pytest.raises(DefectscopeError, match="at least 2"):
        acc.covariance()
    assert accumulator_bytes(5, 4) == acc.sum.numel() * 8 + acc.outer.numel() * 8


def test_regularized_inverse_matches_numpy() -> None:
    x = samples(n=3, d=6)  # rank-deficient covariance: only eps makes it invertible
    cov = GaussianAccumulator(5, 6)
    cov.update(x)
    c = cov.covariance()
    inv = regularized_inverse(c, EPS)
    for pos in range(5):
        ref = np.linalg.inv(c[pos].numpy() + EPS * np.eye(6))
        np.testing.assert_allclose(inv[pos].numpy(), ref, rtol=1e-8, atol=1e-8)


def test_mahalanobis_matches_scipy() -> None:
    x = samples()
    acc = GaussianAccumulator(5, 4)
    acc.update(x)
    mean, inv = acc.mean(), regularized_inverse(acc.covariance(), EPS)
    queries = samples(n=3, seed=1)
    got = mahalanobis(queries, mean, inv, chunk_size=2)  # chunking across positions
    assert got.shape == (3, 5)
    for b in range(3):
        for pos in range(5):
            ref = scipy_mahalanobis(queries[b, pos].numpy(), mean[pos].numpy(), inv[pos].numpy())
            assert got[b, pos].item() == pytest.approx(ref, rel=1e-10)


def test_loo_matches_refit_without_the_sample() -> None:
    x = samples(n=9, p=3, d=5)
    acc = GaussianAccumulator(3, 5)
    acc.update(x)
    loo = loo_mahalanobis(x, acc.mean(), acc.covariance(), EPS)
    assert loo.shape == (9, 3)
    for i in range(9):
        rest = torch.cat([x[:i], x[i + 1 :]]).numpy()
        for pos in range(3):
            mu = rest[:, pos].mean(axis=0)
            inv = np.linalg.inv(np.cov(rest[:, pos], rowvar=False) + EPS * np.eye(5))
            ref = scipy_mahalanobis(x[i, pos].numpy(), mu, inv)
            assert loo[i, pos].item() == pytest.approx(ref, rel=1e-8)
    # and it differs from the in-sample distance (the sample's own influence is removed)
    in_sample = mahalanobis(x, acc.mean(), regularized_inverse(acc.covariance(), EPS))
    assert bool((loo > in_sample).all())


def test_loo_needs_three_samples() -> None:
    x = samples(n=2)
    acc = GaussianAccumulator(5, 4)
    acc.update(x)
    with pytest.raises(DefectscopeError, match="at least 3"):
        loo_mahalanobis(x, acc.mean(), acc.covariance(), EPS)


def test_fit_gaussians_float32_matches_float64_references() -> None:
    x = samples(n=40, p=6, d=8, seed=3)
    mean, inv, loo = fit_gaussians(x.float(), EPS)  # float32 path
    assert mean.dtype == inv.dtype == loo.dtype == torch.float32
    assert mean.shape == (6, 8) and inv.shape == (6, 8, 8) and loo.shape == (40, 6)
    xn = x.numpy()
    for pos in range(6):
        ref_inv = np.linalg.inv(np.cov(xn[:, pos], rowvar=False) + EPS * np.eye(8))  # eq. 1, float64
        np.testing.assert_allclose(mean[pos].numpy(), xn[:, pos].mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(inv[pos].numpy(), ref_inv, rtol=2e-3, atol=2e-3 * np.abs(ref_inv).max())
    # the float32 LOO distances agree with the float64 closed form and with refits without the sample
    ref_loo = loo_mahalanobis(x, x.mean(dim=0), streamed_covariance(x), EPS)
    np.testing.assert_allclose(loo.numpy(), ref_loo.numpy(), rtol=1e-4)
    for i in (0, 23):
        rest = np.delete(xn, i, axis=0)
        for pos in range(6):
            inv_i = np.linalg.inv(np.cov(rest[:, pos], rowvar=False) + EPS * np.eye(8))
            ref = scipy_mahalanobis(xn[i, pos], rest[:, pos].mean(axis=0), inv_i)
            assert loo[i, pos].item() == pytest.approx(ref, rel=1e-4)


def streamed_covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariances (p, d, d) of x (N, p, d) via the streaming accumulator (float64)."""
    acc = GaussianAccumulator(x.shape[1], x.shape[2])
    acc.update(x)
    return acc.covariance()


def test_fit_gaussians_falls_back_to_float64_when_float32_factorisation_fails() -> None:
    # two almost collinear dimensions and a tiny epsilon: float32 Cholesky fails, float64 does not
    x = samples(n=30, p=2, d=6, seed=4)
    x[..., 5] = x[..., 4] + 1e-5 * samples(n=30, p=2, d=6, seed=5)[..., 0]
    cov = torch.from_numpy(np.stack([np.cov(x[:, pos].numpy(), rowvar=False) for pos in range(2)]))
    assert _inverse_cholesky(cov.float(), 1e-12) is None and _inverse_cholesky(cov, 1e-12) is not None
    mean, inv, loo = fit_gaussians(x, 1e-12)
    assert torch.isfinite(loo).all() and inv.dtype == torch.float32
    ref = loo_mahalanobis(x, x.mean(dim=0), cov, 1e-12)  # float64 closed form
    np.testing.assert_allclose(loo.numpy(), ref.numpy(), rtol=1e-5)
    np.testing.assert_allclose(mean.numpy(), x.mean(dim=0).numpy(), rtol=1e-6)
    with pytest.raises(DefectscopeError, match="at least 3"):
        fit_gaussians(x[:2], EPS)
