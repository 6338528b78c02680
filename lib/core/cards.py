"""Model cards (README.md with hub metadata) through huggingface_hub's ModelCard, written atomically."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData

from lib.core.files import atomic_path


def hub_base_model(name: str) -> str | None:
    """``name`` when it is a hub id (links the card to its base model on the hub); None for paths and builtins."""
    if not name or name.startswith("builtin:") or os.path.exists(name) or name.count("/") != 1:
        return None
    return name


def write_model_card(output_dir: str, *, title: str, lines: list[str], library_name: str, tags: list[str],
                     base_model: str | None = None) -> str:
    """Write ``output_dir/README.md``: YAML metadata (library, tags, base model) then ``# title`` and ``lines``."""
    data = ModelCardData(library_name=library_name, tags=tags, base_model=hub_base_model(base_model or ""))
    card = ModelCard("\n".join(["---", data.to_yaml(), "---", "", f"# {title}", "", *lines, ""]))
    path = os.path.join(output_dir, "README.md")
    with atomic_path(path) as tmp:
        card.save(tmp)
    return path
