"""Memory vectors: the frozen model's hidden state at the last token of a text, read through a one-word prompt.

The same function embeds memory entries (for the index and for the ``<recall>`` slots) and questions (to search
the index). The text is wrapped in a prompt that asks for its meaning in one word (``VECTOR_TEMPLATE``), so the
last token has to sum the whole text up rather than guess what follows it.
"""

from __future__ import annotations

import torch

from lib.tools.embeddings import PROMPT_TEMPLATE as VECTOR_TEMPLATE
from lib.tools.embeddings import pool_hidden


@torch.no_grad()
def extract_last_token_embedding(model, tokenizer, texts: list[str], *, layer: int = -1,
                                 template: str = VECTOR_TEMPLATE, batch_size: int = 32, max_length: int = 128,
                                 progress=None) -> torch.Tensor:
    """``(len(texts), hidden)`` float32: the hidden state after decoder layer ``layer`` (-1: the last, after the
    final norm) at each text's last token. ``model`` is a causal LM (a PEFT-wrapped one is read with its adapter
    disabled, so vectors never drift while the adapter trains)."""
    import contextlib

    device = next(model.parameters()).device
    disable = getattr(model, "disable_adapter", None)
    out = []
    was_training = model.training
    model.eval()
    with disable() if disable is not None else contextlib.nullcontext():
        for start in range(0, len(texts), batch_size):
            chunk = [template.format(text=t) for t in texts[start:start + batch_size]]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                            padding_side="right").to(device)
            hidden = model(**enc, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
            out.append(pool_hidden(hidden[layer].float(), enc["attention_mask"], "last").cpu())
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)
