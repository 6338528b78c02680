"""The recall model: a causal LM with one added token, ``<recall>``, LoRA, and a projector that puts a memory
vector at each ``<recall>`` position (as in xRAG).

The input embedding of the k-th ``<recall>`` token of a row is its own (trained) embedding row plus
``projector(memory_vectors[row, k])``; every other token reads as usual. The ``<recall>`` row is trained through
PEFT's ``trainable_token_indices`` (only that row has a trainable copy, so AdamW's weight decay touches nothing
else); it starts at the mean of the existing rows. Saved: the PEFT adapter, ``projector.safetensors``,
``recall_config.json`` and the tokenizer with ``<recall>``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lib.core.errors import UserError
from lib.core.files import atomic_path
from lib.recall.vectors import VECTOR_TEMPLATE

RECALL_TOKEN = "<recall>"
CONFIG_FILE = "recall_config.json"
PROJECTOR_FILE = "projector.safetensors"


@dataclass
class RecallConfig:
    base_model: str
    vector_dim: int
    hidden_size: int
    vector_layer: int = -1
    vector_template: str = VECTOR_TEMPLATE
    recall_token: str = RECALL_TOKEN
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: str = "all-linear"  # or comma-separated module names

    def save(self, folder: str) -> None:
        with atomic_path(os.path.join(folder, CONFIG_FILE)) as tmp, open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, folder: str) -> RecallConfig:
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.exists(path):
            raise UserError(f"{folder} holds no {CONFIG_FILE}; pass the output folder of "
                            "train_memory.py --memory_type recall.")
        with open(path) as f:
            raw = json.load(f)
        if isinstance(raw.get("lora_target_modules"), list):  # written before the option existed
            raw["lora_target_modules"] = ",".join(raw["lora_target_modules"])
        return cls(**raw)


class Projector(nn.Module):
    """Memory vector -> one input embedding: Linear, GELU, Linear (xRAG's two-layer MLP)."""

    def __init__(self, vector_dim: int, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vector_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        # Unit length times sqrt(dim) (entries of about 1): a vector's norm says nothing about its memory, and the
        # index keeps unit vectors anyway. A zero vector stays zero.
        vectors = torch.nn.functional.normalize(vectors, dim=-1) * vectors.shape[-1] ** 0.5
        return self.net(vectors)


def add_recall_token(model, tokenizer, token: str = RECALL_TOKEN) -> int:
    """Add ``token`` (a special token) and its embedding row, set to the mean of the existing rows; the output
    embedding follows when the model ties them. Returns the token id."""
    if token in tokenizer.get_vocab():
        token_id = tokenizer.convert_tokens_to_ids(token)
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        token_id = tokenizer.convert_tokens_to_ids(token)
    rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        old = rows
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[old:] = embeddings[:old].mean(0, keepdim=True)
            output = model.get_output_embeddings()
            if output is not None and output.weight is not embeddings:
                output.weight[old:] = output.weight[:old].mean(0, keepdim=True)
    return token_id


class RecallModel(nn.Module):
    """``peft_model`` (LoRA + the trainable ``<recall>`` row) and the projector; ``forward`` takes
    ``memory_vectors (batch, slots, vector_dim)`` next to the usual inputs."""

    def __init__(self, peft_model, projector: Projector, recall_config: RecallConfig, recall_token_id: int):
        super().__init__()
        self.model = peft_model
        self.projector = projector
        self.recall_config = recall_config
        self.recall_token_id = recall_token_id
        self.config = peft_model.config

    def embed(self, input_ids: torch.Tensor, memory_vectors: torch.Tensor | None) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        slots = input_ids == self.recall_token_id
        count = slots.sum(1)
        if not bool(slots.any()):
            if self.training:  # keep the projector in the graph: DDP expects a gradient for it from every process
                dummy = torch.zeros(1, self.recall_config.vector_dim, device=embeds.device)
                embeds = embeds + 0.0 * self.projector(dummy).sum().to(embeds.dtype)
            return embeds
        if memory_vectors is None or memory_vectors.shape[1] < int(count.max()):
            raise UserError(f"A row has {int(count.max())} {self.recall_config.recall_token} tokens but "
                            f"{0 if memory_vectors is None else memory_vectors.shape[1]} memory vectors; give one "
                            "vector per slot.")
        # The k-th slot of row b reads vector [b, k]: boolean selection is row-major on both sides.
        used = torch.arange(memory_vectors.shape[1], device=input_ids.device)[None, :] < count[:, None]
        projected = self.projector(memory_vectors[used].to(self.projector.net[0].weight.dtype))
        return embeds.masked_scatter(slots[..., None], embeds[slots] + projected.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                memory_vectors: torch.Tensor | None = None, logits_at: torch.Tensor | None = None, **kwargs):
        """The causal LM's output; with ``logits_at`` (a ``(batch, seq)`` bool mask), only the logits at those
        positions ``(n, vocab)``: training needs them at answer tokens only, and the vocabulary projection of every
        other position would be a sixth of a step's work for nothing."""
        embeds = self.embed(input_ids, memory_vectors)
        if logits_at is None:
            return self.model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        causal_lm = self.model.get_base_model()
        hidden = causal_lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)[0]
        return {"logits": causal_lm.get_output_embeddings()(hidden[logits_at])}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory_vectors=None, **kwargs):
        """Greedy or sampled continuations (only the new tokens are returned, as with ``inputs_embeds``)."""
        return self.model.generate(inputs_embeds=self.embed(input_ids, memory_vectors), attention_mask=attention_mask,
                                   **kwargs)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        # The resized embedding matrix is rebuilt on load (the new row starts at the mean); the trained row is in the
        # adapter (trainable_token_indices), so the whole matrix need not be saved.
        self.model.save_pretrained(folder, save_embedding_layers=False)
        with atomic_path(os.path.join(folder, PROJECTOR_FILE)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}, tmp)
        self.recall_config.save(folder)


def plain_language_model(model: RecallModel):
    """The recall model without memory slots as an ordinary transformers model: a copy with the LoRA and the trained
    ``<recall>`` row merged in. What lm-eval needs: it re-ties the embeddings (``tie_weights``), which fails on PEFT's
    trainable-token wrapper around a tied embedding (SmolLM2 ties them)."""
    import copy

    return copy.deepcopy(model.model).merge_and_unload()


def build_recall_model(base, tokenizer, recall_config: RecallConfig) -> RecallModel:
    """A fresh recall model on ``base`` (frozen): token added, LoRA + trainable token row, new projector."""
    from peft import LoraConfig, get_peft_model

    from lib.models.adapters import peft_target_modules

    token_id = add_recall_token(base, tokenizer, recall_config.recall_token)
    lora = LoraConfig(r=recall_config.lora_r, lora_alpha=recall_config.lora_alpha, lora_dropout=0.0,
                      target_modules=peft_target_modules(recall_config.lora_target_modules), task_type="CAUSAL_LM",
                      trainable_token_indices=[token_id])  # a list: the input embedding, whatever its name
    peft_model = get_peft_model(base, lora)
    return RecallModel(peft_model, Projector(recall_config.vector_dim, recall_config.hidden_size), recall_config,
                       token_id)


def load_recall_model(folder: str, *, model_args=None, trainable: bool = False):
    """``(RecallModel, tokenizer)`` from an output folder of train_memory.py --memory_type recall."""
    from peft import PeftModel

    from lib.models.args import ModelArguments
    from lib.models.loading import load_model_and_tokenizer, load_tokenizer

    recall_config = RecallConfig.load(folder)
    model_args = model_args or ModelArguments(model_name_or_path=recall_config.base_model)
    base, _ = load_model_and_tokenizer(model_args)
    tokenizer = load_tokenizer(folder)
    token_id = add_recall_token(base, tokenizer, recall_config.recall_token)
    peft_model = PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    projector = Projector(recall_config.vector_dim, recall_config.hidden_size)
    projector.load_state_dict(load_file(os.path.join(folder, PROJECTOR_FILE)))
    model = RecallModel(peft_model, projector, recall_config, token_id)
    return model.eval() if not trainable else model, tokenizer
