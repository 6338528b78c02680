"""Atomic file output (every file a script hands to a user appears whole or not at all), and the version
records that go into those files."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq


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
        if os.path.isfile(tmp):
            # Some writers create private (0600) files; give the result the permissions of any new file here.
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str, payload: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        f.write("\n")


def write_jsonl(path: str, rows) -> None:
    """JSON lines, one row per line, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_table(table, path: str, fmt: str) -> None:
    """Write a ``pyarrow.Table`` as parquet or JSON lines (full float precision, nested values as JSON)."""
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            pq.write_table(table, tmp)
            return
        with open(tmp, "w", encoding="utf-8") as f:
            for batch in table.to_batches(max_chunksize=4096):
                f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in batch.to_pylist())


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``packages`` (the ones not installed are left out), for results and summaries."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(new: str, target: str) -> None:
    """Put the folder ``new`` at ``target``, replacing what is there, with no moment where ``target`` is missing.

    On Linux the two folders are swapped in one step and the old one is then removed. Elsewhere the old folder is
    first renamed aside (a moment without ``target`` remains there).
    """
    if not os.path.exists(target):
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    aside = f"{target}.old-{os.getpid()}"
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside)
