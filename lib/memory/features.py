"""The bank's frozen representations: every entry read on its own by the frozen backbone (token embeddings and the
hidden states of the layers the gate and the fusions read), computed once per backbone, bank, layers and dtype and
kept in the disk cache. They are never saved with a model: the bank is saved as text and read again."""

from __future__ import annotations

import torch

from lib.memory.bank import MemoryBank


@torch.no_grad()
def encode_bank(backbone, bank: MemoryBank, layers: list[int], batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Frozen representations ``{layer: (N, L, H)}`` of the bank's tokens (layer 0: token embeddings), each entry
    read on its own. Call it on a backbone without active memory hooks (``MemoryModel.memory_off()``)."""
    wanted = sorted(set(layers))
    device = next(backbone.parameters()).device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    was_training = backbone.training
    backbone.eval()
    for start in range(0, len(bank), batch_size):
        ids = bank.input_ids[start:start + batch_size].to(device)
        mask = bank.attention_mask[start:start + batch_size].to(device)
        hidden = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                          use_cache=False).hidden_states
        for layer in wanted:
            out[layer].append(hidden[layer].cpu())
    backbone.train(was_training)
    size = backbone.config.hidden_size
    return {layer: (torch.cat(chunks) if chunks else torch.zeros(0, bank.max_entry_tokens, size))
            for layer, chunks in out.items()}


def cached_bank_features(weights: str, bank: MemoryBank, layers: list[int], dtype: torch.dtype,
                         compute) -> dict[int, torch.Tensor]:
    """:func:`encode_bank`'s result through the disk cache, keyed by the backbone weights' fingerprint, the bank's
    fingerprint, the layers and the dtype; ``compute()`` returns it when the cache has not. An empty bank costs
    nothing and is never stored."""
    from lib.core.cache import cached_tensor

    if not len(bank):
        return compute()
    key = (f"memory-{weights.split(':')[-1][:16]}-{bank.fingerprint()}-{'_'.join(map(str, layers))}-"
           f"{str(dtype).split('.')[-1]}")

    def stack():
        features = compute()  # once: every layer comes from the same pass
        return torch.stack([features[layer] for layer in layers])

    stacked, _ = cached_tensor("memory", key, stack)
    return {layer: stacked[i] for i, layer in enumerate(layers)}


def bank_features(model_args, args, memory, bank):
    """The bank's frozen representations for a training run, through the disk cache (:func:`cached_bank_features`).

    Under ZeRO-3 the loaded backbone is partitioned and cannot run alone, so a full copy reads the bank."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from lib.models.deepspeed import zero3_init_disabled
    from lib.models.loading import load_model

    layers = memory.feature_layers()

    def compute():
        if not is_deepspeed_zero3_enabled():
            with memory.memory_off():
                return encode_bank(memory.backbone, bank, layers)
        with zero3_init_disabled(args):
            full = load_model(model_args.model_name_or_path, dtype=model_args.dtype,
                              revision=model_args.model_revision)
        return encode_bank(full, bank, layers)

    with args.main_process_first(desc="bank features"):
        return cached_bank_features(memory.weights_fingerprint(), bank, layers,
                                    next(memory.backbone.parameters()).dtype, compute)
