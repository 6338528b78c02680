"""Where each bank entry sits in the product-key grid, decided by its content.

Product keys score an entry in cell (i, j) as ``q1 . row_key[i] + q2 . col_key[j]``; that only means something if
the entries of one row (one column) have something in common. Rows are a balanced k-means of the entries' key
vectors' first halves, columns a balanced k-means of their second halves (product quantisation), and a global
greedy pass then gives every entry a cell of its own, near its two nearest centroids. A grid of side
``ceil(sqrt(N))`` has ``side**2 - N`` empty cells, which lookups never return.

Hand-written because no library here does capacity-constrained assignment at this size (2^20 entries: about 80 s
on two CPU cores, benchmarks/bench_memory_gate.py): scipy's Hungarian solver is cubic, faiss' k-means is not
balanced. No step loops in Python over the entries.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CHUNK = 65536  # rows of the point-to-centroid distance matrix held at once


def grid_side(n: int) -> int:
    return max(1, math.isqrt(max(n, 1) - 1) + 1)


def _nearest(x: np.ndarray, centroids: np.ndarray, top: int, bias: np.ndarray,
             group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` nearest centroids of every point, nearest first, and their squared distances, in chunks of rows.

    ``bias[group[p]]`` is added to point p's distances: ``|c|^2``, or infinity for a centroid p may not take. With
    one row, ``bias`` applies to every point and ``group`` is not read.
    """
    n, top = len(x), min(top, len(centroids))
    neg2c = -2.0 * centroids.T
    cand, cand_d = np.empty((n, top), dtype=np.int64), np.empty((n, top), dtype=np.float32)
    buf = np.empty((min(n, CHUNK), len(centroids)), dtype=np.float32)
    for start in range(0, n, CHUNK):
        chunk = x[start:start + CHUNK]
        d = np.matmul(chunk, neg2c, out=buf[:len(chunk)])  # |x|^2 is left out: it does not change a row's order
        d += bias if len(bias) == 1 else bias[group[start:start + CHUNK]]
        dist, idx = torch.from_numpy(d).topk(top, dim=1, largest=False)
        cand[start:start + CHUNK] = idx.numpy()
        cand_d[start:start + CHUNK] = dist.numpy() + (chunk ** 2).sum(1, keepdims=True)
    return cand, cand_d


def _greedy(cand: np.ndarray, cand_d: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Cluster of every point (-1 for none) from its candidate clusters ``cand`` (nearest first, at ``cand_d``):
    the greedy that takes the (point, cluster) pairs nearest first and keeps each whose point has no cluster yet
    and whose cluster is below ``capacity``.

    Computed as deferred acceptance, in rounds rather than a loop over the pairs: every point without a cluster
    proposes to its next candidate and every cluster keeps its ``capacity`` nearest proposals so far, rejecting
    the rest. When points and clusters rank pairs by the same distances, that stable matching is unique and is the
    greedy's (an exact tie in distance goes to the proposal the cluster already holds, deterministically).
    """
    n, top = cand.shape
    # A pair's sort key among its cluster's: (cluster, distance), packed in one int64 (clusters below 2^31); the
    # bits of a non-negative float32 order like its value.
    keys = (cand << 32) + np.maximum(cand_d, 0).view(np.int32)
    held_keys, held_points = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    tried = np.zeros(n, dtype=np.int64)
    proposers = np.arange(n)
    while proposers.size:
        new = keys[proposers, tried[proposers]]
        order = np.argsort(new, kind="stable")
        at = np.searchsorted(held_keys, new[order], side="right")  # an equal key already held stays ahead
        held_keys = np.insert(held_keys, at, new[order])
        held_points = np.insert(held_points, at, proposers[order])
        clusters = held_keys >> 32
        pos = np.arange(len(held_keys))
        first = np.maximum.accumulate(np.where(np.r_[True, clusters[1:] != clusters[:-1]], pos, 0))
        keep = pos - first < capacity[clusters]
        rejected = held_points[~keep]
        held_keys, held_points = held_keys[keep], held_points[keep]
        tried[rejected] += 1
        proposers = rejected[tried[rejected] < top]
    assign = np.full(n, -1, dtype=np.int64)
    assign[held_points] = held_keys >> 32
    return assign


def _fill(x: np.ndarray, centroids: np.ndarray, group: np.ndarray, room: np.ndarray, top: int = 8) -> np.ndarray:
    """Centroid of every point, nearest first: point p may take centroid c while ``room[group[p], c] > 0``.

    Each pass offers every point still without a centroid its ``top`` nearest centroids with room and runs the
    greedy over those pairs. A pass always places the nearest of them, and every group has room for its points
    (``room.sum(1)`` at least their number), so passes end with every point placed.
    """
    k = room.shape[1]
    c2 = (centroids ** 2).sum(1)
    room = room.copy()
    assign = np.full(len(x), -1, dtype=np.int64)
    left = np.arange(len(x))
    while left.size:
        bias = np.where(room > 0, c2, np.inf)
        if (room > 0).all():
            bias = bias[:1]  # nothing full yet: one row for every point
        cand, cand_d = _nearest(x[left], centroids, top, bias, group[left])
        got = _greedy(group[left, None] * k + cand, cand_d, room.reshape(-1))
        placed = got >= 0
        assign[left[placed]] = got[placed] % k
        room -= np.bincount(got[placed], minlength=room.size).reshape(room.shape)
        left = left[~placed]
    return assign


def _balanced_kmeans(x: np.ndarray, k: int, capacity: int, iters: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Assignments of the points to ``k`` clusters of at most ``capacity``, and the clusters' centroids."""
    n = len(x)
    centroids = x[rng.choice(n, size=k, replace=n < k)].copy()
    assign = np.zeros(n, dtype=np.int64)
    one_group, room = np.zeros(n, dtype=np.int64), np.full((1, k), capacity, dtype=np.int64)
    for _ in range(iters):
        assign = _fill(x, centroids, one_group, room)
        sums = torch.zeros(k, x.shape[1]).index_add_(0, torch.from_numpy(assign), torch.from_numpy(x)).numpy()
        counts = np.bincount(assign, minlength=k)[:, None]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids).astype(np.float32)
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
    # Column centroids from a balanced k-means of the second halves; then, within its row, every entry takes a
    # column of its own (one entry per cell), nearest column centroid first, globally greedy.
    _, col_centroids = _balanced_kmeans(x[:, half:], side, side, iters, rng)
    cols = _fill(x[:, half:], col_centroids, rows, np.ones((side, side), dtype=np.int64))
    return torch.from_numpy(rows * side + cols)
