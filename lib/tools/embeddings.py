"""Frozen-LLM embeddings of tools and queries (one pooled forward pass per text), cached on disk."""

from __future__ import annotations

import hashlib
import json

import torch

# PromptEOL: asking for the text's meaning in one word makes the last token sum the whole text up.
PROMPT_TEMPLATE = 'This sentence: "{text}" means in one word: "'
POOLINGS = ("mean", "weighted_mean", "last", "prompt_last")
MAX_LENGTH = 256  # tokens of one prompted text the LLM reads; longer ones are cut


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real tokens; position-weighted mean (weights 1, 2, 3, ...: in a causal model later tokens have
    read more of the text); or the last real token (right padding)."""
    mask = mask.to(hidden.dtype)
    if pooling in ("mean", "weighted_mean"):
        weights = mask * mask.cumsum(1) if pooling == "weighted_mean" else mask
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
    last = mask.sum(1).long() - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def prompted(texts: list[str], pooling: str, template: str = PROMPT_TEMPLATE) -> list[str]:
    """The texts as the LLM reads them: inside ``template`` for ``prompt_last``, as they are otherwise."""
    return [template.format(text=t) for t in texts] if pooling == "prompt_last" else list(texts)


def pool_batch(model, enc, *, pooling: str, layer: int = -1) -> torch.Tensor:
    """Pooled hidden states (fp32) of one right-padded batch ``enc`` (``input_ids``, ``attention_mask``) read by
    ``model``'s decoder (no LM head); gradients flow when the caller allows them (a query-side LoRA trains so)."""
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if layer == -1:
        hidden = model.base_model(**inputs, use_cache=False)[0]
    else:
        hidden = model.base_model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[layer]
    return pool_hidden(hidden.float(), enc["attention_mask"], "last" if pooling == "prompt_last" else pooling)


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str], *, pooling: str, layer: int = -1,
                template: str = PROMPT_TEMPLATE, batch_size: int = 16, max_length: int = MAX_LENGTH,
                progress=None) -> torch.Tensor:
    """One frozen forward pass per text (batched), pooled hidden states in fp32.

    ``pooling``: one of :data:`POOLINGS`; ``prompt_last`` reads the last token of ``template`` around the text.
    ``layer``: the hidden states after that decoder layer (-1: the last, after the final norm)."""
    device = next(model.parameters()).device
    texts = prompted(texts, pooling, template)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        padding_side="right").to(device)
        out.append(pool_batch(model, enc, pooling=pooling, layer=layer).cpu())
        if progress is not None:
            for i, text in enumerate(chunk):
                progress(start + i, text)
    return torch.cat(out)


def embeddings_cache_key(weights: str, model_settings: dict, texts: list[str], pooling: str, layer: int = -1,
                         template: str = PROMPT_TEMPLATE) -> str:
    """Cache key of a table of embeddings: the model weights' content fingerprint (never its name: a model
    retrained at the same path must not reuse old embeddings), how it was loaded, the pooling, layer and prompt,
    and the texts."""
    how = {"weights": weights, "model": model_settings, "pooling": pooling, "version": 2}
    if layer != -1 or pooling == "prompt_last":  # keys of the earlier settings stay what they were
        how.update(layer=layer, template=template if pooling == "prompt_last" else None)
    h = hashlib.sha256(json.dumps(how, sort_keys=True, default=str).encode())
    for text in texts:
        h.update(b"\x00" + text.encode())
    return h.hexdigest()[:24]
