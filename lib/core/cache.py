"""The toolkit's on-disk cache (``$SIDEKIT_CACHE``) and content fingerprints.

Everything cached that depends on model weights is keyed by the weights' *content*, never by a model's name or
config: retraining a local model at the same path must never reuse results computed with the old weights.
Hashing a large file is slow, so each file's digest is remembered against its path, size, modification time and
inode (the way git's index avoids rehashing unchanged files); any rewrite changes one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from lib.core.files import atomic_path, write_json

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_dir() -> Path:
    """Where builtin models, embeddings and the lm-eval task pack are cached (``$SIDEKIT_CACHE`` or
    ``~/.cache/sidekit``)."""
    root = os.environ.get("SIDEKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sidekit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, remembered against (path, size, mtime, inode) so unchanged files hash once."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo_dir = cache_dir() / "digests"
    memo = memo_dir / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".json")
    if memo.exists():
        try:
            record = json.loads(memo.read_text())
            if record.get("stamp") == stamp:
                return record["sha256"]
        except (OSError, ValueError):
            pass  # a damaged memo is recomputed below
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = "sha256:" + h.hexdigest()
    write_json(str(memo), {"stamp": stamp, "sha256": digest})
    return digest


def folder_weights_fingerprint(folder: str) -> str:
    """Fingerprint of a model folder: the content of its weight files and its config."""
    names = sorted(n for n in os.listdir(folder)
                   if n.endswith(_WEIGHT_SUFFIXES) or n in ("config.json", "adapter_config.json"))
    if not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        raise FileNotFoundError(f"{folder} holds no weight files")
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}={file_digest(os.path.join(folder, name))};".encode())
    return "sha256:" + h.hexdigest()


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """Fingerprint of in-memory tensors (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def cached_tensor(namespace: str, key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """``(tensor, was_cached)``: load ``key`` from ``$SIDEKIT_CACHE/<namespace>``, or compute and store it atomically.

    Concurrent processes (torchrun ranks) compute it once: the others wait on a file lock and then read it.
    """
    folder = cache_dir() / namespace
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))["value"], True
    with FileLock(str(folder / f"{key}.lock")):
        if path.exists():
            return load_file(str(path))["value"], True
        value = compute()
        with atomic_path(str(path)) as tmp:
            save_file({"value": value.contiguous()}, tmp)
    return value, False
