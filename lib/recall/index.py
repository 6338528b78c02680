"""Memory vectors in a FAISS index, stored with their entries and searched per user.

Vectors are unit-normalised, so the inner product is the cosine. Up to ``exact_limit`` entries the index is exact
(``IndexFlatIP``); above it, HNSW (graph search, no training, entries can be added later). A search names a user
and FAISS only considers that user's rows (an ``IDSelectorBatch``), so one user's memories never answer another's
question, whatever their vectors.

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

    def __init__(self, entries: list[dict], vectors: np.ndarray, *, exact_limit: int = 50_000,
                 hnsw_neighbours: int = 32, ef_search: int = 128):
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
        self.ef_search = ef_search
        if len(entries) > exact_limit:
            self.index = faiss.IndexHNSWFlat(self.dim, hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = max(2 * hnsw_neighbours, 64)
        else:
            self.index = faiss.IndexFlatIP(self.dim)
        if len(vectors):
            self.index.add(_unit(vectors))
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
        return "hnsw" if "HNSW" in type(self.index).__name__ else "exact"

    def search(self, queries: np.ndarray, user_id: str, k: int = 5) -> list[list[tuple[float, dict]]]:
        """The ``k`` nearest entries of ``user_id`` for each query vector: ``[[(cosine, entry), ...], ...]``."""
        return [[(score, self.entries[row]) for score, row in hits] for hits in self.search_rows(queries, user_id, k)]

    def vectors(self, rows: list[int]) -> np.ndarray:
        """The stored (unit) vectors of entry rows ``(len(rows), dim)``."""
        if not len(rows):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.index.reconstruct(int(r)) for r in rows])

    def search_rows(self, queries: np.ndarray, user_id: str, k: int = 5) -> list[list[tuple[float, int]]]:
        """As :meth:`search`, with entry row numbers instead of entries."""
        import faiss

        queries = _unit(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32))
        rows = self.user_rows.get(str(user_id))
        if rows is None or not len(self.entries):
            return [[] for _ in queries]
        selector = faiss.IDSelectorBatch(rows)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self.index.search(queries, min(k, len(rows)), params=params)
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
        index.ef_search = 128
        index._rows_of_user()
        return index


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
