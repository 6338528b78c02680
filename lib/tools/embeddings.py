"""Frozen-LLM embeddings of tools and queries (one pooled forward pass per text), cached on disk."""

from __future__ import annotations

import hashlib
import json

import torch


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


def embeddings_cache_key(weights: str, model_settings: dict, texts: list[str], pooling: str) -> str:
    """Cache key of a table of embeddings: the model weights' content fingerprint (never its name: a model
    retrained at the same path must not reuse old embeddings), how it was loaded, the pooling and the texts."""
    h = hashlib.sha256(json.dumps({"weights": weights, "model": model_settings, "pooling": pooling, "version": 2},
                                  sort_keys=True, default=str).encode())
    for text in texts:
        h.update(b"\x00" + text.encode())
    return h.hexdigest()[:24]
