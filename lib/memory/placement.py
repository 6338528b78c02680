"""Where each bank entry sits in the product-key grid, decided by its content.

Product keys score an entry in cell (i, j) as ``q1 . row_key[i] + q2 . col_key[j]``; that only means something if
the entries of one row (one column) have something in common. Rows are a balanced k-means of the entries' key
vectors' first halves, columns a balanced k-means of their second halves (product quantisation), and a global
greedy pass then gives every entry a cell of its own, near its two nearest centroids. A grid of side
``ceil(sqrt(N))`` has ``side**2 - N`` empty cells, which lookups never return.

Hand-written because no library here does capacity-constrained assignment at this size (2^20 entries in seconds):
scipy's Hungarian solver is cubic, faiss' k-means is not balanced.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def grid_side(n: int) -> int:
    return max(1, math.isqrt(max(n, 1) - 1) + 1)


def _nearest(dist_to: callable, n: int, k: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` nearest of ``k`` clusters for each of ``n`` points, and their distances (in chunks of rows)."""
    top = min(top, k)
    cand, cand_d = [], []
    for start in range(0, n, 65536):
        d = dist_to(start, min(n, start + 65536))  # (chunk, k)
        idx = np.argpartition(d, top - 1, axis=1)[:, :top] if top < k else np.tile(np.arange(k), (len(d), 1))
        cand.append(idx)
        cand_d.append(np.take_along_axis(d, idx, axis=1))
    return np.concatenate(cand), np.concatenate(cand_d)


def _balanced_assign(dist_to: callable, n: int, k: int, capacity: int, top: int = 8) -> np.ndarray:
    """Assign ``n`` points to ``k`` clusters of at most ``capacity`` points, nearest first (greedy over the sorted
    point-cluster distances of every point's ``top`` nearest clusters; leftovers go to the nearest open cluster)."""
    cand_c, cand_d = _nearest(dist_to, n, k, top)
    order = np.argsort(cand_d, axis=None, kind="stable")
    points, clusters = np.unravel_index(order, cand_d.shape)
    clusters = cand_c[points, clusters]
    assign = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for p, c in zip(points.tolist(), clusters.tolist()):
        if assign[p] < 0 and load[c] < capacity:
            assign[p] = c
            load[c] += 1
    left = np.flatnonzero(assign < 0)
    for p in left.tolist():
        d = dist_to(p, p + 1)[0]
        d[load >= capacity] = np.inf
        c = int(np.argmin(d))
        assign[p] = c
        load[c] += 1
    return assign


def _sq_dist(x: np.ndarray, centroids: np.ndarray):
    c2 = (centroids ** 2).sum(1)

    def dist(start: int, end: int) -> np.ndarray:
        chunk = x[start:end]
        return (chunk ** 2).sum(1, keepdims=True) - 2.0 * chunk @ centroids.T + c2[None]
    return dist


def _balanced_kmeans(x: np.ndarray, k: int, capacity: int, iters: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Assignments of the points to ``k`` clusters of at most ``capacity``, and the clusters' centroids."""
    n = len(x)
    centroids = x[rng.choice(n, size=k, replace=n < k)].copy()
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        assign = _balanced_assign(_sq_dist(x, centroids), n, k, capacity)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)[:, None]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    return assign, centroids


def place_entries(keys: torch.Tensor, *, iters: int = 4, seed: int = 0) -> torch.Tensor:
    """Cell index (``row * side + col``) of every entry, each cell used once; ``keys`` is ``(N, d)`` with even d."""
    n = int(keys.shape[0])
    side = grid_side(n)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    x = keys.detach().float().cpu().numpy()
    half = x.shape[1] // 2
    rng = np.random.default_rng(seed)
    rows, _ = _balanced_kmeans(x[:, :half], side, side, iters, rng)
    # Column centroids from a balanced k-means of the second halves, then one entry per cell.
    _, col_centroids = _balanced_kmeans(x[:, half:], side, side, iters, rng)
    dist = _sq_dist(x[:, half:], col_centroids)
    # Every (row, column) cell holds one entry: assign within each row with capacity 1 per column, globally greedy.
    cand, cand_d = _nearest(dist, n, side, 8)
    order = np.argsort(cand_d, axis=None, kind="stable")
    points, slots = np.unravel_index(order, cand_d.shape)
    cells = rows[points] * side + cand[points, slots]
    taken = np.zeros(side * side, dtype=bool)
    cell_of = np.full(n, -1, dtype=np.int64)
    for p, c in zip(points.tolist(), cells.tolist()):
        if cell_of[p] < 0 and not taken[c]:
            cell_of[p] = c
            taken[c] = True
    for p in np.flatnonzero(cell_of < 0).tolist():
        free = np.flatnonzero(~taken[rows[p] * side:(rows[p] + 1) * side])
        d = dist(p, p + 1)[0][free]
        c = rows[p] * side + int(free[np.argmin(d)])
        cell_of[p] = c
        taken[c] = True
    return torch.from_numpy(cell_of)
