"""Atomic file output (every file a script hands to a user appears whole or not at all), and the version
records that go into those files."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    # Keep the extension: writers such as matplotlib pick the format from it.
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, payload: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        f.write("\n")


def write_table(table, path: str, fmt: str) -> None:
    """Write a ``pyarrow.Table`` as parquet or JSON lines (full float precision, nested values as JSON)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        if fmt == "parquet":
            pq.write_table(table, tmp)
            return
        with open(tmp, "w", encoding="utf-8") as f:
            for batch in table.to_batches(max_chunksize=4096):
                for row in batch.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``packages`` (the ones not installed are left out), for results and summaries."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
