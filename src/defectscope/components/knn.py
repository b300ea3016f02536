"""Exact Euclidean nearest-neighbour search over a memory bank, optionally leaving one group out.

Two interchangeable backends: ``"faiss"`` (exact ``IndexFlatL2``) and ``"torch"`` (chunked brute
force). Both return Euclidean (not squared) distances in ascending order.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import DefectscopeError

log = logging.getLogger(__name__)

__all__ = ["NearestNeighbors", "BACKENDS"]

BACKENDS = ("faiss", "torch")


class NearestNeighbors:
    """Exact k-nearest-neighbour search in a (M, D) float32 bank.

    ``groups`` (M,) optionally tags each bank entry with an integer group, e.g. the training image
    it came from. ``search(queries, k, exclude_group=g)`` then returns the k nearest entries among
    those whose group != g, which gives leave-one-image-out scores. The exclusion is exact: the
    torch backend gives the excluded entries an infinite distance; the faiss backend asks for
    k + n_g neighbours (n_g = number of entries in group g), which always contains at least k
    entries outside g, and keeps the first k of those.

    If faiss cannot be imported, ``backend="faiss"`` falls back to ``"torch"`` with a logged
    warning; :attr:`backend` tells which one is in use.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        backend: str = "faiss",
        chunk_size: int = 4096,
        groups: torch.Tensor | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise DefectscopeError(f"unknown nearest-neighbour backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[0] == 0:
            shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
            raise DefectscopeError(f"the memory bank must be a non-empty (M, D) tensor, got {shape}")
        if chunk_size < 1:
            raise DefectscopeError(f"chunk_size must be >= 1, got {chunk_size}")
        self.bank = bank.detach().to(torch.float32).contiguous()
        self.chunk_size = chunk_size
        self.groups: torch.Tensor | None = None
        if groups is not None:
            if not isinstance(groups, torch.Tensor) or groups.shape != (self.bank.shape[0],) or groups.is_floating_point():
                raise DefectscopeError(
                    f"groups must be a ({self.bank.shape[0]},) integer tensor, one group id per bank entry"
                )
            self.groups = groups.detach().to(torch.int64).contiguous()

        self._index: Any = None
        self.backend = backend
        if backend == "faiss":
            try:
                import faiss
            except ImportError:
                log.warning("faiss is not installed: nearest-neighbour search falls back to the torch backend")
                self.backend = "torch"
            else:
                faiss.omp_set_num_threads(torch.get_num_threads())
                self._index = faiss.IndexFlatL2(self.bank.shape[1])
                self._index.add(self.bank.numpy())
        if self.backend == "torch":
            self._bank_sq = (self.bank * self.bank).sum(dim=1)  # ||b||^2, (M,)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(
        self, queries: torch.Tensor, k: int = 1, exclude_group: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (Q, k) float32 (Euclidean, ascending) and indices (Q, k) int64 of the k nearest.

        queries: (Q, D). With ``exclude_group`` set, bank entries of that group are ignored
        (needs ``groups`` at construction). Works over chunks of ``chunk_size`` queries, so
        memory is O(chunk_size x M).
        """
        queries = self._check_queries(queries)
        n_bank = self.bank.shape[0]
        excluded: torch.Tensor | None = None
        n_excluded = 0
        if exclude_group is not None:
            if self.groups is None:
                raise DefectscopeError("exclude_group needs the bank's groups: build NearestNeighbors(bank, groups=...)")
            excluded = self.groups == int(exclude_group)
            n_excluded = int(excluded.sum())
        if not isinstance(k, int) or k < 1:
            raise DefectscopeError(f"k must be a positive integer, got {k!r}")
        if k > n_bank - n_excluded:
            raise DefectscopeError(
                f"k={k} neighbours asked but the bank has only {n_bank - n_excluded} usable entries"
            )

        n_queries = queries.shape[0]
        distances = torch.empty(n_queries, k, dtype=torch.float32)
        indices = torch.empty(n_queries, k, dtype=torch.int64)
        for lo in range(0, n_queries, self.chunk_size):
            chunk = queries[lo : lo + self.chunk_size]
            if self.backend == "faiss":
                d2, idx = self._faiss_chunk(chunk, k, exclude_group, n_excluded)
            else:
                d2, idx = self._torch_chunk(chunk, k, excluded)
            distances[lo : lo + chunk.shape[0]] = d2.clamp_min_(0.0).sqrt_()
            indices[lo : lo + chunk.shape[0]] = idx
        return distances, indices

    def search_excluding(
        self, queries: torch.Tensor, k: int, exclude_group: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as ``search(queries, k, exclude_group=exclude_group)``."""
        return self.search(queries, k, exclude_group=exclude_group)

    def search_excluding_own(
        self, queries: torch.Tensor, query_groups: torch.Tensor, max_block: int = 1 << 25
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest entry (distance (Q,), index (Q,)) of each query among bank entries of another group.

        queries (Q, D), query_groups (Q,) integer: query q ignores entries whose group equals
        query_groups[q]. Exact brute force (||q||^2 - 2 q.b + ||b||^2 with a per-row mask) in
        chunks of at most ``max_block`` distances, so memory stays O(max_block), not O(Q x M).
        Used for leave-one-image-out scores of many images' patches in one pass.
        """
        queries = self._check_queries(queries)
        if self.groups is None:
            raise DefectscopeError("search_excluding_own needs the bank's groups: build NearestNeighbors(bank, groups=...)")
        if query_groups.shape != (queries.shape[0],) or query_groups.is_floating_point():
            raise DefectscopeError(f"query_groups must be a ({queries.shape[0]},) integer tensor, one group per query")
        bank_sq = getattr(self, "_bank_sq", None)
        if bank_sq is None:
            bank_sq = self._bank_sq = (self.bank * self.bank).sum(dim=1)
        n_queries, n_bank = queries.shape[0], self.bank.shape[0]
        step = max(1, max_block // n_bank)
        distances = torch.empty(n_queries, dtype=torch.float32)
        indices = torch.empty(n_queries, dtype=torch.int64)
        for lo in range(0, n_queries, step):
            chunk = queries[lo : lo + step]
            d2 = torch.addmm(bank_sq.unsqueeze(0), chunk, self.bank.T, beta=1.0, alpha=-2.0)
            own = self.groups.unsqueeze(0) == query_groups[lo : lo + step].long().unsqueeze(1)
            d2.masked_fill_(own, float("inf"))
            best, idx = d2.min(dim=1)
            best.add_((chunk * chunk).sum(dim=1))
            distances[lo : lo + chunk.shape[0]] = best.clamp_min_(0.0).sqrt_()
            indices[lo : lo + chunk.shape[0]] = idx
        if not torch.isfinite(distances).all():
            raise DefectscopeError("search_excluding_own: some query's group holds every bank entry; nothing is left to match")
        return distances, indices

    # ----------------------------------------------------------------- backends
    def _faiss_chunk(
        self, chunk: torch.Tensor, k: int, exclude_group: int | None, n_excluded: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices (q, k) from faiss; over-fetches by n_excluded to filter."""
        d2, idx = self._index.search(chunk.numpy(), k + n_excluded)
        d2_t = torch.from_numpy(d2)
        idx_t = torch.from_numpy(idx)
        if exclude_group is None or n_excluded == 0:
            return d2_t, idx_t
        assert self.groups is not None
        dropped = (self.groups[idx_t] == int(exclude_group)).to(torch.uint8)
        # stable sort keeps the ascending distance order among the entries that are kept
        keep = torch.sort(dropped, dim=1, stable=True).indices[:, :k]
        return d2_t.gather(1, keep), idx_t.gather(1, keep)

    def _torch_chunk(
        self, chunk: torch.Tensor, k: int, excluded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices (q, k) by brute force: ||q||^2 - 2 q.b + ||b||^2."""
        bank_sq = self._bank_sq
        if excluded is not None:
            bank_sq = bank_sq.masked_fill(excluded, float("inf"))  # excluded entries are never nearest
        d2 = torch.addmm(bank_sq.unsqueeze(0), chunk, self.bank.T, beta=1.0, alpha=-2.0)
        d2.add_((chunk * chunk).sum(dim=1, keepdim=True))
        return torch.topk(d2, k, dim=1, largest=False, sorted=True)

    def _check_queries(self, queries: torch.Tensor) -> torch.Tensor:
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise DefectscopeError(f"queries must be a (Q, {self.bank.shape[1]}) tensor like the bank, got {shape}")
        return queries.detach().to(torch.float32).contiguous()
