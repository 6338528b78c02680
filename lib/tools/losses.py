"""The tool encoder's scores and loss (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tool_logits(query: torch.Tensor, tools: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(batch, tools)`` cosine similarity of queries and tool vectors around ``center``, over ``temperature``."""
    q = F.normalize(query - center, dim=-1)
    t = F.normalize(tools - center, dim=-1)
    return q @ t.T / temperature


def residual_logits(query: torch.Tensor, residual: torch.Tensor, semantic: torch.Tensor, center: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Scores from the resource residual alone, on the scale of :func:`tool_logits`.

    Each tool's residual is divided by the norm of its centred semantic vector, as the full tool vector is before
    the cosine, so these logits are what the resources add. They are zero while the gate is closed.
    """
    q = F.normalize(query - center, dim=-1)
    scale = (semantic - center).norm(dim=-1).clamp_min(1e-6)
    return q @ (residual / scale[:, None]).T / temperature


def tool_encoder_loss(logits: torch.Tensor, res_logits: torch.Tensor, target: torch.Tensor,
                      resource_rows: torch.Tensor, resource_coef: float, tool_weight: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, tool CE, resource CE)``. The resource term is a cross-entropy over the residual logits of the
    resource-dependent rows only: those rows can be answered only through the resource features, and its gradient
    reaches the gate even while it is closed (d tanh(alpha) / d alpha = 1 at 0). ``tool_weight`` (one per tool)
    weighs the tool term's rows by their target, as ``F.cross_entropy(weight=...)`` does."""
    tool = F.cross_entropy(logits, target, weight=tool_weight)
    per_row = F.cross_entropy(res_logits, target, reduction="none")
    weight = resource_rows.to(per_row.dtype)
    resource = (per_row * weight).sum() / weight.sum().clamp_min(1)
    return tool + resource_coef * resource, tool, resource


def balanced_tool_weights(targets: list[int], num_tools: int) -> torch.Tensor:
    """One weight per tool, inversely proportional to its training queries (mean 1 over the tools that have any),
    so that every tool counts the same in the tool term however many queries name it; 0 for tools without."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=num_tools).float()
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    return weight * (counts > 0).sum() / weight.sum().clamp_min(1e-12)


def group_loss(logits: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross-entropy, rows)``: each query against only the tools of its target's group (the tools that do the
    same job, where resources decide); ``rows`` counts the queries whose group has two or more tools, the only
    ones with a term (zero loss when there are none)."""
    same = groups[target][:, None] == groups[None, :]
    rows = same.sum(-1) > 1
    if not rows.any():
        return logits.sum() * 0, rows.sum()
    masked = logits.masked_fill(~same, torch.finfo(logits.dtype).min)
    return F.cross_entropy(masked[rows], target[rows]), rows.sum()
