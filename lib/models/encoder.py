"""Tool/resource encoder: frozen LLM semantics of each tool plus resource facts through a zero-initialised gate.

``tool = semantic + tanh(alpha) * fuse(semantic, resource)``. The semantic table comes from one forward pass of
the frozen LLM per tool and is a buffer; only the resource MLP and the fusion (gate included) train. With
alpha = 0 the tool vectors are exactly the semantic embeddings, so training starts from pure semantics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from lib.errors import UserError


@dataclass
class Tool:
    name: str
    description: str
    resources: dict[str, float]

    def text(self) -> str:
        return f"{self.name}: {self.description}"


def load_tools(path: str) -> list[Tool]:
    """Read and validate ``tools.json`` (a list of ``{"name", "description", "resources": {...}}``)."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass --tools_file with a JSON list of tools.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}).") from err
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} must hold a non-empty JSON list of tools.")
    tools, seen = [], set()
    for i, entry in enumerate(data):
        where = f"{path} tool {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise UserError(f"{where} needs a non-empty string 'name'.")
        name = entry["name"].strip()
        where = f"{path} tool '{name}'"
        if name in seen:
            raise UserError(f"{path} lists the tool '{name}' twice; tool names must be unique.")
        seen.add(name)
        if "description" not in entry:
            if "desc" in entry:
                raise UserError(f"{where} uses the old field 'desc'; rename it to 'description'.")
            raise UserError(f"{where} has no 'description'; every tool needs one (its semantic embedding reads it).")
        description = entry["description"]
        if not isinstance(description, str) or not description.strip():
            raise UserError(f"{where} has an empty 'description'; describe what the tool does.")
        resources = entry.get("resources", {})
        if not isinstance(resources, dict):
            raise UserError(f"{where}: 'resources' must be an object of numeric facts, e.g. {{\"latency_ms\": 40}}.")
        clean = {}
        for key, value in resources.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{where}: resource '{key}' is {value!r}; resources must be finite numbers.")
            clean[key] = float(value)
        tools.append(Tool(name, description.strip(), clean))
    return tools


def resource_matrix(tools: list[Tool]) -> tuple[torch.Tensor, list[str]]:
    """``(tools, 2 * keys)``: each resource z-scored over the tools (log scale for positive, wide-ranging facts such
    as latency or memory), plus a 0/1 column saying whether the tool reports it. Missing values are 0."""
    keys = sorted({k for t in tools for k in t.resources})
    cols, masks = [], []
    for key in keys:
        values = [t.resources.get(key) for t in tools]
        present = [v for v in values if v is not None]
        use_log = all(v > 0 for v in present) and max(present) / max(min(present), 1e-12) > 20
        xs = [math.log(v) if use_log else v for v in present]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) or 1.0
        cols.append([0.0 if v is None else ((math.log(v) if use_log else v) - mean) / std for v in values])
        masks.append([0.0 if v is None else 1.0 for v in values])
    if not keys:
        return torch.zeros(len(tools), 0), []
    features = torch.tensor(cols + masks, dtype=torch.float32).T.contiguous()
    return features, keys


class ToolEncoder(nn.Module):
    """Semantic table (buffer) + resource MLP + gated multi-head-attention fusion."""

    def __init__(self, semantic: torch.Tensor, resources: torch.Tensor, *, d_resource: int | None = None,
                 num_attention_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        num_tools, hidden = semantic.shape
        d_resource = d_resource or hidden
        if hidden % num_attention_heads:
            raise UserError(f"--num_attention_heads {num_attention_heads} must divide the model's hidden size {hidden}.")
        self.register_buffer("semantic", semantic.float().clone())
        self.register_buffer("resources", resources.float().clone())
        # Hidden states share a large common direction; scores compare tools around their mean.
        self.register_buffer("center", semantic.float().mean(0))
        # The fusion's output is normalised to each tool's own semantic spread, so that tanh(alpha) alone sets how
        # much the resources move a tool vector (alpha = 0.1: about a tenth of its distance from the mean).
        self.register_buffer("spread", (semantic.float() - semantic.float().mean(0)).norm(dim=-1) / hidden ** 0.5)
        self.resource_in = nn.Linear(resources.shape[1], d_resource) if resources.shape[1] else None
        self.tool_term = nn.Embedding(num_tools, d_resource)  # what the listed facts do not say about a tool
        nn.init.normal_(self.tool_term.weight, std=0.02)
        self.resource_out = nn.Sequential(nn.GELU(), nn.Linear(d_resource, hidden))
        self.attention = nn.MultiheadAttention(hidden, num_attention_heads, dropout=dropout, batch_first=True)
        self.fuse_out = nn.Linear(hidden, hidden)
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot take.
        self.alpha = nn.Parameter(torch.zeros(1))
        # Trainer/DeepSpeed read sizes (e.g. for "auto" bucket sizes) from a config.
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(hidden_size=hidden, num_tools=num_tools, d_resource=d_resource,
                                       num_attention_heads=num_attention_heads)

    @property
    def num_tools(self) -> int:
        return self.semantic.shape[0]

    def resource_vectors(self) -> torch.Tensor:
        h = self.tool_term.weight
        if self.resource_in is not None:
            h = h + self.resource_in(self.resources)
        return self.resource_out(h)

    def fuse(self, semantic: torch.Tensor, resource: torch.Tensor) -> torch.Tensor:
        """Each tool's semantic vector attends over its own semantic and resource vectors."""
        tokens = torch.stack([semantic, resource], dim=1)  # (tools, 2, hidden)
        out, _ = self.attention(semantic[:, None], tokens, tokens, need_weights=False)
        out = self.fuse_out(out[:, 0])
        return nn.functional.layer_norm(out, out.shape[-1:]) * self.spread[:, None]

    def residual(self) -> torch.Tensor:
        """``tanh(alpha) * fuse(semantic, resource)``: everything the resources add to the tool vectors."""
        return torch.tanh(self.alpha) * self.fuse(self.semantic, self.resource_vectors())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tool vectors, residual)``; one call, so data-parallel wrappers see every trained parameter used."""
        residual = self.residual()
        return self.semantic + residual, residual

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the resource MLP and the fusion, the gate included (the semantic table is a buffer)."""
        return list(self.parameters())


# --------------------------------------------------------------------------------------------------
# Frozen LLM embeddings (semantic table, queries), cached on disk
# --------------------------------------------------------------------------------------------------

def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real tokens, or the last real token (right padding)."""
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    last = mask.sum(1).long() - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str], *, pooling: str, batch_size: int = 16, max_length: int = 256,
                progress=None) -> torch.Tensor:
    """One frozen forward pass per text (batched), pooled last hidden states in fp32."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        padding_side="right").to(device)
        hidden = model.base_model(**enc, use_cache=False)[0].float()
        out.append(pool_hidden(hidden, enc["attention_mask"], pooling).cpu())
        if progress is not None:
            for i, text in enumerate(chunk):
                progress(start + i, text)
    return torch.cat(out)


def embeddings_cache_key(model_id: str, model_config: dict, texts: list[str], pooling: str) -> str:
    h = hashlib.sha256(json.dumps({"model": model_id, "config": model_config, "pooling": pooling, "version": 1},
                                  sort_keys=True, default=str).encode())
    for text in texts:
        h.update(b"\x00" + text.encode())
    return h.hexdigest()[:24]


def cached_embeddings(key: str, compute) -> tuple[torch.Tensor, bool]:
    """``(embeddings, was_cached)``: load ``key`` from the cache, or compute and store it atomically."""
    from safetensors.torch import load_file, save_file

    from lib.files import atomic_path
    from lib.models.loading import cache_dir

    path = cache_dir() / "embeddings" / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))["embeddings"], True
    embeddings = compute()
    with atomic_path(str(path)) as tmp:
        save_file({"embeddings": embeddings.contiguous()}, tmp)
    return embeddings, False
