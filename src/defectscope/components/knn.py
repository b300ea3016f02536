"""Euclidean nearest-neighbour search over a memory bank, optionally leaving one group out.

Two interchangeable backends: ``"faiss"`` and ``"torch"`` (chunked brute force, exact). The faiss
backend uses one of three indexes: ``"flat"`` (exact ``IndexFlatL2``, the default), ``"hnsw"``
(approximate graph search, ``IndexHNSWFlat``, Malkov & Yashunin 2018) or ``"ivf"`` (approximate
inverted lists over a k-means partition, ``IndexIVFFlat``). All return Euclidean (not squared)
distances in ascending order; the approximate indexes store the raw vectors, so each distance
they return is the true distance of the entry returned, only the entry may not be the nearest.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

from ..errors import DefectscopeError

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "INDEXES", "NearestNeighbors", "default_nlist"]

BACKENDS = ("faiss", "torch")
INDEXES = ("flat", "hnsw", "ivf")

# Defaults measured on the MVTec AD bottle PatchCore bank (21402 x 152, 10 % coreset) with 20000
# test-image patches as queries (benchmarks/bench_knn.py has the full table):
#   HNSW M=32, efConstruction=40: recall@1 0.992 / 0.998 / 0.9996 at efSearch 32 / 64 / 128; below
#   128 a few queries (0.1 %) land in the wrong part of the graph with a distance many times too
#   large, which a PatchCore anomaly map shows as a hot spot. efConstruction 80 or 200 gave LOWER
#   recall on this bank (stronger pruning of long links), so faiss's own 40 is kept.
#   IVF nlist=548 (the default rule): recall@1 0.983 / 0.995 / 0.998 at nprobe 4 / 8 / 16.
HNSW_M = 32
EF_CONSTRUCTION = 40
EF_SEARCH = 128
NPROBE = 16

IVF_MIN_POINTS_PER_LIST = 39
"""faiss k-means wants at least this many training points per centroid (it warns below that)."""


def default_nlist(n_bank: int) -> int:
    """Number of IVF lists for a bank of ``n_bank`` entries: about 4 sqrt(M), at most M / 39.

    4 sqrt(M) is the usual rule of thumb (lists of ~sqrt(M)/4 entries); the cap gives every list
    the 39 training points faiss k-means asks for. 0 means the bank is too small for an IVF index.
    """
    return max(0, min(round(4.0 * math.sqrt(n_bank)), n_bank // IVF_MIN_POINTS_PER_LIST))


class NearestNeighbors:
    """k-nearest-neighbour search in a (M, D) float32 bank, exact or approximate.

    ``groups`` (M,) optionally tags each bank entry with an integer group, e.g. the training image
    it came from. ``search(queries, k, exclude_group=g)`` then returns the k nearest entries among
    those whose group != g, which gives leave-one-image-out scores. The torch backend gives the
    excluded entries an infinite distance; the faiss backend asks for k + n_g neighbours (n_g =
    number of entries in group g), which with the exact flat index always contains at least k
    entries outside g, and keeps the first k of those. With an approximate index the result is
    approximate too (the over-fetched list is itself approximate); a query for which it holds
    fewer than k entries outside g (IVF lists too few, HNSW graph not reached) is answered by
    exact brute force instead, so k valid neighbours always come back.

    index: ``"flat"`` exact (default), ``"hnsw"`` or ``"ivf"`` approximate; the approximate ones
    need the faiss backend. Parameters (ignored by the other indexes):
        hnsw_m: graph degree M (links per node; 2M on the bottom layer).
        ef_construction: candidate-list size while building the graph.
        ef_search: candidate-list size while searching (raised to k + n_excluded when smaller).
        nlist: number of IVF lists; None = :func:`default_nlist`. Reduced (logged) when the bank
            has fewer than 39 entries per list; below 2 lists the index falls back to flat.
        nprobe: lists scanned per query (at most nlist).
        seed: seeds the IVF k-means (training sample and initial centroids).
    The HNSW graph is built with one faiss thread: faiss's classic builder inserts nodes in
    parallel under per-node locks, so there the graph depends on thread timing. (faiss 1.15 gave
    identical graphs with 1, 2 and 4 threads, but one thread keeps builds identical whatever the
    faiss version, and on 2 busy cores it was not slower.) Searches use torch's thread count and
    are deterministic: each query is searched independently.

    If faiss cannot be imported, ``backend="faiss"`` falls back to ``"torch"`` (exact, whatever
    the index asked for) with a logged warning; :attr:`backend` and :attr:`index` tell what is
    in use.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        backend: str = "faiss",
        chunk_size: int = 4096,
        groups: torch.Tensor | None = None,
        index: str = "flat",
        *,
        hnsw_m: int = HNSW_M,
        ef_construction: int = EF_CONSTRUCTION,
        ef_search: int = EF_SEARCH,
        nlist: int | None = None,
        nprobe: int = NPROBE,
        seed: int = 0,
    ) -> None:
        if backend not in BACKENDS:
            raise DefectscopeError(f"unknown nearest-neighbour backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if index not in INDEXES:
            raise DefectscopeError(f"unknown nearest-neighbour index {index!r}: use one of {', '.join(INDEXES)}")
        if index != "flat" and backend != "faiss":
            raise DefectscopeError(
                f"index={index!r} is an approximate faiss index: use backend='faiss', or index='flat' with backend={backend!r}"
            )
        for name, value in (
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
            ("nprobe", nprobe),
        ):
            if not isinstance(value, int) or value < 1:
                raise DefectscopeError(f"{name} must be a positive integer, got {value!r}")
        if nlist is not None and (not isinstance(nlist, int) or nlist < 1):
            raise DefectscopeError(f"nlist must be a positive integer or None, got {nlist!r}")
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[0] == 0:
            shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
            raise DefectscopeError(f"the memory bank must be a non-empty (M, D) tensor, got {shape}")
        if chunk_size < 1:
            raise DefectscopeError(f"chunk_size must be >= 1, got {chunk_size}")
        self.bank = bank.detach().to(torch.float32).contiguous()
        self.chunk_size = chunk_size
        self.groups: torch.Tensor | None = None
        if groups is not None:
            if (
                not isinstance(groups, torch.Tensor)
                or groups.shape != (self.bank.shape[0],)
                or groups.is_floating_point()
            ):
                raise DefectscopeError(
                    f"groups must be a ({self.bank.shape[0]},) integer tensor, one group id per bank entry"
                )
            self.groups = groups.detach().to(torch.int64).contiguous()

        self._index: Any = None
        self.backend = backend
        self.index = index
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.nprobe = nprobe
        self.nlist: int | None = None
        if backend == "faiss":
            try:
                import faiss
            except ImportError:
                log.warning(
                    "faiss is not installed: nearest-neighbour search falls back to the torch backend"
                    + (f" (exact, not index={index!r})" if index != "flat" else "")
                )
                self.backend = "torch"
                self.index = "flat"
            else:
                faiss.omp_set_num_threads(torch.get_num_threads())
                if index == "ivf":
                    self.nlist = self._ivf_lists(nlist)
                    if self.nlist is None:
                        self.index = "flat"
                if self.index == "flat":
                    self._index = faiss.IndexFlatL2(self.bank.shape[1])
                    self._index.add(self.bank.numpy())
                elif self.index == "hnsw":
                    self._index = self._build_hnsw(faiss, hnsw_m, ef_construction)
                else:
                    assert self.nlist is not None
                    self.nprobe = min(nprobe, self.nlist)
                    self._index = self._build_ivf(faiss, self.nlist, seed)

    def _ivf_lists(self, nlist: int | None) -> int | None:
        """The number of IVF lists to use for this bank; None = too small, use flat (logged)."""
        n_bank = self.bank.shape[0]
        cap = n_bank // IVF_MIN_POINTS_PER_LIST
        want = default_nlist(n_bank) if nlist is None else nlist
        if cap < 2:
            log.info(
                "bank of %d entries is too small for an IVF index (needs %d per list): using the exact flat index",
                n_bank,
                IVF_MIN_POINTS_PER_LIST,
            )
            return None
        if want > cap:
            log.warning(
                "nlist=%d needs %d bank entries to train, the bank has %d: using nlist=%d",
                want,
                want * IVF_MIN_POINTS_PER_LIST,
                n_bank,
                cap,
            )
            want = cap
        return max(2, want)

    def _build_hnsw(self, faiss: Any, m: int, ef_construction: int) -> Any:
        """IndexHNSWFlat over the bank, built single-threaded so that two builds are identical."""
        index = faiss.IndexHNSWFlat(self.bank.shape[1], m)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = self.ef_search
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(self.bank.numpy())
        finally:
            faiss.omp_set_num_threads(threads)
        return index

    def _build_ivf(self, faiss: Any, nlist: int, seed: int) -> Any:
        """IndexIVFFlat over the bank with a seeded k-means coarse quantizer (IndexFlatL2)."""
        quantizer = faiss.IndexFlatL2(self.bank.shape[1])
        index = faiss.IndexIVFFlat(quantizer, self.bank.shape[1], nlist, faiss.METRIC_L2)
        index.cp.seed = int(seed)
        index.train(self.bank.numpy())
        index.add(self.bank.numpy())
        index.nprobe = self.nprobe
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        return index

    def _search_params(self, n_fetch: int) -> Any:
        """faiss per-call search parameters: efSearch >= the number fetched (HNSW), nprobe (IVF)."""
        import faiss

        if self.index == "hnsw":
            # faiss's SWIG classes take keyword arguments its stubs do not declare
            return faiss.SearchParametersHNSW(efSearch=max(self.ef_search, n_fetch))  # type: ignore[attr-defined]
        if self.index == "ivf":
            return faiss.SearchParametersIVF(nprobe=self.nprobe)  # type: ignore[call-arg]
        return None

    def __len__(self) -> int:
        return self.bank.shape[0]

    @functools.cached_property
    def bank_sq(self) -> torch.Tensor:
        """||b||^2 of every bank entry (M,), computed on first use by the brute-force paths."""
        return (self.bank * self.bank).sum(dim=1)

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
                raise DefectscopeError(
                    "exclude_group needs the bank's groups: build NearestNeighbors(bank, groups=...)"
                )
            excluded = self.groups == int(exclude_group)
            n_excluded = int(excluded.sum())
        if not isinstance(k, int) or k < 1:
            raise DefectscopeError(f"k must be a positive integer, got {k!r}")
        if k > n_bank - n_excluded:
            raise DefectscopeError(f"k={k} neighbours asked but the bank has only {n_bank - n_excluded} usable entries")

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

    def search_excluding(self, queries: torch.Tensor, k: int, exclude_group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as ``search(queries, k, exclude_group=exclude_group)``."""
        return self.search(queries, k, exclude_group=exclude_group)

    # ----------------------------------------------------------------- backends
    def _faiss_chunk(
        self, chunk: torch.Tensor, k: int, exclude_group: int | None, n_excluded: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices (q, k) from faiss; over-fetches by n_excluded to filter.

        Rows where the (approximate) index found fewer than k usable entries are redone exactly.
        """
        n_fetch = k + n_excluded
        if self.index == "flat":
            d2, idx = self._index.search(chunk.numpy(), n_fetch)
        else:
            d2, idx = self._index.search(chunk.numpy(), n_fetch, params=self._search_params(n_fetch))
        d2_t = torch.from_numpy(d2)
        idx_t = torch.from_numpy(idx)
        missing = idx_t < 0  # faiss pads with -1 when a row has fewer results than asked
        if (exclude_group is None or n_excluded == 0) and not bool(missing.any()):
            return d2_t, idx_t
        dropped = missing
        if exclude_group is not None and n_excluded:
            assert self.groups is not None
            dropped = dropped | (self.groups[idx_t.clamp_min(0)] == int(exclude_group))
        # stable sort keeps the ascending distance order among the entries that are kept
        keep = torch.sort(dropped.to(torch.uint8), dim=1, stable=True).indices[:, :k]
        d2_t, idx_t = d2_t.gather(1, keep), idx_t.gather(1, keep)
        short = dropped.gather(1, keep).any(dim=1)  # rows with fewer than k usable entries
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            log.debug(
                "%d queries got fewer than %d usable neighbours from the %s index: searched exactly",
                rows.numel(),
                k,
                self.index,
            )
            groups = self.groups
            excluded = None if exclude_group is None or groups is None else groups == int(exclude_group)
            d2_t[rows], idx_t[rows] = self._torch_chunk(chunk[rows], k, excluded)
        return d2_t, idx_t

    def _torch_chunk(
        self, chunk: torch.Tensor, k: int, excluded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices (q, k) by brute force: ||q||^2 - 2 q.b + ||b||^2.

        The torch backend's search, and the exact redo of rows an approximate index left short.
        """
        bank_sq = self.bank_sq
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
