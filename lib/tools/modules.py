"""Tool/resource encoder: frozen LLM semantics of each tool plus resource facts through a zero-initialised gate.

``tool = semantic + tanh(alpha) * fuse(semantic, resource)``. The semantic table comes from one forward pass of
the frozen LLM per tool and is a buffer; only the resource MLP and the fusion (gate included) train. With
alpha = 0 the tool vectors are exactly the semantic embeddings, so training starts from pure semantics.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from lib.core.errors import UserError


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
        # alpha as the last forward pass saw it, for logs: under ZeRO-3 the parameter itself is only whole inside
        # forward (gathered by DeepSpeed's hooks) and an empty partition everywhere else. A plain tensor, not a
        # buffer: it is no part of the model's state.
        self.last_alpha = torch.zeros(1)
        # Trainer/DeepSpeed read sizes (e.g. for "auto" bucket sizes) from a config.
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
        self.last_alpha = self.alpha.detach().clone()
        return self.semantic + residual, residual


class QueryAdaptedEncoder(nn.Module):
    """The tool encoder plus a LoRA-adapted LLM that encodes the queries (``--query_lora_r``).

    With frozen queries a wish like "within 50 ms" can only move the scores along directions the frozen embedding
    happens to give it; training low-rank adapters of the LLM lets the queries themselves learn to say which
    resource they care about. The adapters start at zero (PEFT initialises LoRA's B to zero), so at step 0 the
    queries are the frozen embeddings and the scores are still pure semantics. The tool table stays the frozen
    model's (computed before the adapters exist).
    """

    def __init__(self, tools: ToolEncoder, query_llm: nn.Module, *, pooling: str, layer: int = -1):
        super().__init__()
        self.tools = tools
        self.query_llm = query_llm  # a PEFT model: only its adapters train
        self.pooling, self.layer = pooling, layer
        self.config = tools.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query embeddings, tool vectors, residual)`` for one right-padded batch of prompted queries."""
        from lib.tools.embeddings import pool_batch

        query = pool_batch(self.query_llm.get_base_model(), {"input_ids": input_ids, "attention_mask": attention_mask},
                           pooling=self.pooling, layer=self.layer)
        tool_vectors, residual = self.tools()
        return query, tool_vectors, residual
