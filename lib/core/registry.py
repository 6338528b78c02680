"""Named components with fallbacks.

A registry maps a name to a component where several implementations of one job exist (attention kernels, the
scores select_data.py ranks by, router kinds; next the memory fusions and vector indexes), so that a YAML recipe
can choose one by name. An entry may declare an availability check and a fallback: asking for an unavailable
entry walks its fallback chain with a warning instead of failing, which is how an attention implementation
degrades from flash-attention to sdpa to eager on a machine or model that lacks the faster one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import is_flash_attn_2_available

from lib.core.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    name: str
    obj: Any
    fallback: str | None
    available: Callable[..., bool] | None


class Registry:
    """A name -> component table whose entries may declare an availability check and a fallback."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, obj: Any = None, *, fallback: str | None = None,
                 available: Callable[..., bool] | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        ``available(*context)`` receives what :meth:`chain` / :meth:`get` are given (e.g. the model class).
        """
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

    def chain(self, name: str, *context: Any) -> list[str]:
        """The usable names to try, in order: ``name`` if available, then its available fallbacks."""
        names, seen = [], set()
        current: str | None = name
        while current is not None and current not in seen:
            seen.add(current)
            entry = self._entry(current)
            if entry.available is None or entry.available(*context):
                names.append(current)
            else:
                logger.warning("%s '%s' is not available here; falling back to '%s'.",
                               self.kind, current, entry.fallback)
            current = entry.fallback
        if not names:
            raise UserError(f"No usable {self.kind} in the fallback chain of '{name}'.")
        return names

    def get(self, name: str, *context: Any) -> Any:
        """The first available component in the fallback chain of ``name``."""
        return self._entry(self.chain(name, *context)[0]).obj


# --------------------------------------------------------------------------------------------------
# Attention implementations: flash-attention -> sdpa -> eager, checked against the machine and the model class
# --------------------------------------------------------------------------------------------------

def _flash_attention_available(model_class: type | None = None) -> bool:
    supported = model_class is None or getattr(model_class, "_supports_flash_attn", False)
    return bool(supported) and torch.cuda.is_available() and is_flash_attn_2_available()


def _sdpa_available(model_class: type | None = None) -> bool:
    supported = model_class is None or getattr(model_class, "_supports_sdpa", False)
    return bool(supported) and hasattr(torch.nn.functional, "scaled_dot_product_attention")


ATTENTION = Registry("attention implementation")
ATTENTION.register("flash_attention_2", "flash_attention_2", fallback="sdpa", available=_flash_attention_available)
ATTENTION.register("sdpa", "sdpa", fallback="eager", available=_sdpa_available)
ATTENTION.register("eager", "eager")


def resolve_attn_implementation(requested: str | None, model_class: type | None = None) -> str | None:
    """The attention implementation to load ``model_class`` with; ``None`` leaves the choice to transformers."""
    if requested is None:
        return None
    return ATTENTION.get(requested, model_class)
