"""Named components with fallbacks.

A registry maps a name to an object and, optionally, to an availability check and a fallback name. Asking
for an unavailable entry walks its fallback chain with a warning instead of failing, which is how an
attention implementation degrades from flash-attention to sdpa to eager on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lib.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    obj: Any
    fallback: str | None
    available: Callable[[], bool] | None


class Registry:
    """A name -> component table whose entries may declare an availability check and a fallback."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, obj: Any = None, *, fallback: str | None = None,
                 available: Callable[[], bool] | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if obj is None:
            def decorator(fn):
                self.register(name, fn, fallback=fallback, available=available)
                return fn
            return decorator
        self._entries[name] = _Entry(name, obj, fallback, available)
        return obj

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise UserError(f"Unknown {self.kind} '{name}'; choose one of: {', '.join(self._entries)}.")
        return self._entries[name]

    def chain(self, name: str) -> list[str]:
        """The usable names to try, in order: ``name`` if available, then its available fallbacks."""
        names, seen = [], set()
        current: str | None = name
        while current is not None and current not in seen:
            seen.add(current)
            entry = self._entry(current)
            if entry.available is None or entry.available():
                names.append(current)
            else:
                logger.warning("%s '%s' is not available here; falling back to '%s'.",
                               self.kind, current, entry.fallback)
            current = entry.fallback
        if not names:
            raise RuntimeError(f"No usable {self.kind} in the fallback chain of '{name}'.")
        return names

    def get(self, name: str) -> Any:
        """The first available component in the fallback chain of ``name``."""
        return self._entry(self.chain(name)[0]).obj


# --------------------------------------------------------------------------------------------------
# Attention implementations: flash-attention -> sdpa -> eager
# --------------------------------------------------------------------------------------------------

def _flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


ATTENTION = Registry("attention implementation")
ATTENTION.register("flash_attention_2", "flash_attention_2", fallback="sdpa", available=_flash_attn_available)
ATTENTION.register("sdpa", "sdpa", fallback="eager",
                   available=lambda: hasattr(torch.nn.functional, "scaled_dot_product_attention"))
ATTENTION.register("eager", "eager")


def resolve_attn_implementation(requested: str | None) -> list[str | None]:
    """Implementations to try in order; ``None`` leaves the choice to transformers."""
    if requested is None:
        return [None]
    return [ATTENTION.get(name) for name in ATTENTION.chain(requested)]


# --------------------------------------------------------------------------------------------------
# Router kinds trained by train_router.py. Each entry finds the router modules of a loaded model;
# lib.models.moe registers "moe". The explicit-memory MemoryGate registers itself here later.
# --------------------------------------------------------------------------------------------------

ROUTERS = Registry("router type")
