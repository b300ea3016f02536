"""Compiled greedy k-center with triangle-inequality pruning (imported lazily; needs numba).

State per point i: its nearest centre a(i) (a position in the selection) and the squared distance
d2(i) to it; each centre keeps a linked list of its points, the largest d2 among them and the
point that has it. When centre c is added, a point can only move to c if ||c - a(i)|| < 2 d(i)
(triangle inequality), so a centre j whose ||c - j|| >= 2 max_i d(i) is skipped whole, and inside
a scanned list only points passing the test get a distance computed. Distances are summed in
blocks and abandoned once they pass the bound they are tested against (sums of squares only grow).
The next centre is the point with the largest d2 (lowest index on ties), found from the per-centre
maxima in O(K).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# a little slack on the pruning bounds so float rounding can only add candidates, never drop one
_SLACK = np.float32(1.0 + 1e-4)
_BLOCK = 16


@njit(cache=True, fastmath=True, nogil=True, inline="always")
def _sq_dist_bounded(a: np.ndarray, i: int, b: np.ndarray, j: int, bound: np.float32) -> np.float32:
    """||a_i - b_j||^2, or some value >= ``bound`` as soon as the partial sum reaches it."""
    d = a.shape[1]
    total = np.float32(0.0)
    lo = 0
    while lo < d:
        hi = min(lo + _BLOCK, d)
        acc = np.float32(0.0)
        for t in range(lo, hi):
            diff = a[i, t] - b[j, t]
            acc += diff * diff
        total += acc
        if total >= bound:
            return total
        lo = hi
    return total


@njit(cache=True, nogil=True)
def kcenter_pruned(x: np.ndarray, start: int, selected: np.ndarray, sq_dist: np.ndarray, nearest: np.ndarray) -> None:
    """Greedy k-center of (N, d) float32 ``x`` from ``start``; fills selected (K,), sq_dist (N,), nearest (N,)."""
    n = x.shape[0]
    k_total = selected.shape[0]
    inf = np.float32(np.inf)
    head = np.full(k_total, -1, np.int64)  # first point of each centre's list
    nxt = np.full(n, -1, np.int64)  # next point in the same list
    radius2 = np.full(k_total, np.float32(-1.0), np.float32)  # largest d2 in the list (-1: empty)
    far = np.zeros(k_total, np.int64)  # the point with it (lowest index on ties)
    # centre coordinates copied contiguously: the centre-to-centre pass streams through memory
    cx = np.empty((k_total, x.shape[1]), np.float32)

    c = start
    selected[0] = c
    cx[0] = x[c]
    # first centre: every other point belongs to it
    best_r, best_i = np.float32(-1.0), n
    for i in range(n - 1, -1, -1):
        nearest[i] = 0
        if i == c:
            sq_dist[i] = 0.0
            continue
        d2 = _sq_dist_bounded(x, i, cx, 0, inf)
        sq_dist[i] = d2
        nxt[i] = head[0]
        head[0] = i
        if d2 > best_r or (d2 == best_r and i < best_i):
            best_r, best_i = d2, i
    radius2[0], far[0] = best_r, best_i

    for k in range(1, k_total):
        # next centre: argmax over all points of d2 = argmax over centres of their maxima
        owner = -1
        best_r, best_i = np.float32(-1.0), n
        for j in range(k):
            r = radius2[j]
            if r > best_r or (r == best_r and r >= 0 and far[j] < best_i):
                best_r, best_i, owner = r, far[j], j
        c = best_i
        selected[k] = c
        cx[k] = x[c]
        sq_dist[c] = 0.0
        nearest[c] = k
        new_r, new_i = np.float32(-1.0), n
        for j in range(k):
            if head[j] < 0:
                continue
            bound = np.float32(4.0) * radius2[j] * _SLACK
            if j == owner:
                dcc2 = _sq_dist_bounded(cx, k, cx, j, inf)  # scanned anyway: c leaves this list
            else:
                dcc2 = _sq_dist_bounded(cx, k, cx, j, bound)
                if dcc2 >= bound:
                    continue  # ||c - j|| >= 2 max d(i): no point of j can move to c
            # scan j's list: unlink points that move to c, recompute j's maximum
            prev = -1
            i = head[j]
            r_j, f_j = np.float32(-1.0), n
            while i >= 0:
                after = nxt[i]
                moved = i == c
                if not moved:
                    d2_i = sq_dist[i]
                    if dcc2 < np.float32(4.0) * d2_i * _SLACK:
                        d2 = _sq_dist_bounded(x, i, cx, k, d2_i)
                        if d2 < d2_i:
                            sq_dist[i] = d2
                            nearest[i] = k
                            moved = True
                            nxt[i] = head[k]
                            head[k] = i
                            if d2 > new_r or (d2 == new_r and i < new_i):
                                new_r, new_i = d2, i
                if moved:
                    if prev < 0:
                        head[j] = after
                    else:
                        nxt[prev] = after
                else:
                    d2_i = sq_dist[i]
                    if d2_i > r_j or (d2_i == r_j and i < f_j):
                        r_j, f_j = d2_i, i
                    prev = i
                i = after
            radius2[j], far[j] = r_j, f_j
        radius2[k], far[k] = new_r, new_i
