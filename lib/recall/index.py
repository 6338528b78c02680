"""Memory vectors in a FAISS index, stored with their entries and searched per user.

Vectors are unit-normalised, so the inner product is the cosine. Up to ``exact_limit`` entries the index is exact
(``IndexFlatIP``); above it, IVF (``IndexIVFFlat``: k-means lists, ``nprobe`` of them searched; a run rebuilds the
index, so the lists always fit the data). A search names a user and only that user's rows are considered, so one
user's memories never answer another's question, whatever their vectors: a user with up to ``user_exact_rows`` rows
(the usual case: tens to hundreds of memories) is searched exactly over their own stored vectors, which is both
exact and fast; a larger user goes through the index with an ``IDSelectorBatch`` of their rows. (A filtered
approximate search over a few rows among many misses most of them: graph or list search rarely reaches them.)

The folder holds ``memories.faiss`` (the index) and ``memories.jsonl`` (one entry per row, in index order:
``{"user_id", "text", ...}``), both written atomically.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lib.core.errors import DataError
from lib.core.files import atomic_path

INDEX_FILE = "memories.faiss"
ENTRIES_FILE = "memories.jsonl"


class MemoryIndex:
    """Entries ``[{"user_id", "text", ...}]`` and their vectors ``(N, D)``."""

    def __init__(self, entries: list[dict], vectors: np.ndarray, *, exact_limit: int = 50_000, nprobe: int = 32,
                 user_exact_rows: int = 4096, seed: int = 0):
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(entries):
            raise DataError(f"{len(entries)} memory entries came with vectors of shape {vectors.shape}; give one "
                            "vector per entry.")
        missing = [i for i, e in enumerate(entries) if not e.get("user_id") or not e.get("text")]
        if missing:
            raise DataError(f"memory entry {missing[0]} has no user_id or no text; every entry needs both.")
        self.entries = [dict(e) for e in entries]
        self.dim = vectors.shape[1]
        self.user_exact_rows = user_exact_rows
        vectors = _unit(vectors)
        if len(entries) > exact_limit:
            self.index = ivf_index(vectors, nprobe=nprobe, seed=seed)
        else:
            self.index = faiss.IndexFlatIP(self.dim)
            self.index.add(vectors)
        self._rows_of_user()

    def _rows_of_user(self) -> None:
        rows: dict[str, list[int]] = {}
        for i, entry in enumerate(self.entries):
            rows.setdefault(str(entry["user_id"]), []).append(i)
        self.user_rows = {user: np.asarray(r, dtype=np.int64) for user, r in rows.items()}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def kind(self) -> str:
        return "ivf" if "IVF" in type(self.index).__name__ else "exact"

    def search(self, queries: np.ndarray, user_id: str, k: int = 5) -> list[list[tuple[float, dict]]]:
        """The ``k`` nearest entries of ``user_id`` for each query vector: ``[[(cosine, entry), ...], ...]``."""
        return [[(score, self.entries[row]) for score, row in hits] for hits in self.search_rows(queries, user_id, k)]

    def vectors(self, rows: list[int]) -> np.ndarray:
        """The stored (unit) vectors of entry rows ``(len(rows), dim)``."""
        if not len(rows):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def search_rows(self, queries: np.ndarray, user_id: str, k: int = 5) -> list[list[tuple[float, int]]]:
        """As :meth:`search`, with entry row numbers instead of entries."""
        import faiss

        queries = _unit(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32))
        rows = self.user_rows.get(str(user_id))
        if rows is None or not len(self.entries):
            return [[] for _ in queries]
        k = min(k, len(rows))
        if len(rows) <= self.user_exact_rows:
            scores = queries @ self.vectors(rows).T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return [[(float(s[j]), int(rows[j])) for j in row] for s, row in zip(scores, order)]
        selector = faiss.IDSelectorBatch(rows)
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self.index.search(queries, k, params=params)
        return [[(float(s), int(i)) for s, i in zip(row_scores, row_ids) if i >= 0]
                for row_scores, row_ids in zip(scores, ids)]

    def save(self, folder: str) -> None:
        import faiss

        os.makedirs(folder, exist_ok=True)
        with atomic_path(os.path.join(folder, INDEX_FILE)) as tmp:
            faiss.write_index(self.index, tmp)
        with atomic_path(os.path.join(folder, ENTRIES_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in self.entries)

    @classmethod
    def load(cls, folder: str) -> MemoryIndex:
        import faiss

        paths = [os.path.join(folder, name) for name in (INDEX_FILE, ENTRIES_FILE)]
        if not all(os.path.exists(p) for p in paths):
            raise DataError(f"{folder} holds no memory index ({INDEX_FILE} and {ENTRIES_FILE}); pass the output "
                            "folder of a recall-memory run.")
        index = cls.__new__(cls)
        index.index = faiss.read_index(paths[0])
        with open(paths[1], encoding="utf-8") as f:
            index.entries = [json.loads(line) for line in f]
        if index.index.ntotal != len(index.entries):
            raise DataError(f"{folder}: the index holds {index.index.ntotal} vectors but {ENTRIES_FILE} "
                            f"{len(index.entries)} entries; the folder is damaged, rebuild the index.")
        index.dim = index.index.d
        index.user_exact_rows = 4096
        if index.kind == "ivf":
            faiss.extract_index_ivf(index.index).make_direct_map()
        index._rows_of_user()
        return index


def ivf_index(vectors: np.ndarray, *, nprobe: int = 32, seed: int = 0):
    """An inner-product IVF index over unit ``vectors``: about 4·sqrt(N) lists, k-means trained on a sample of at
    most 40 vectors per list, 10 k-means rounds, ``nprobe`` lists searched; rows can be reconstructed (for exact per-user search)."""
    import faiss

    n, dim = vectors.shape
    lists = max(1, min(int(4 * np.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(n, size=min(n, 40 * lists), replace=False)
    index.cp.seed, index.cp.niter = seed, 10
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = min(nprobe, lists)
    index.make_direct_map()
    return index


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
