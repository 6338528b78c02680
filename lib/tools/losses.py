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
                      resource_rows: torch.Tensor, resource_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, tool CE, resource CE)``. The resource term is a cross-entropy over the residual logits of the
    resource-dependent rows only: those rows can be answered only through the resource features, and its gradient
    reaches the gate even while it is closed (d tanh(alpha) / d alpha = 1 at 0)."""
    tool = F.cross_entropy(logits, target)
    per_row = F.cross_entropy(res_logits, target, reduction="none")
    weight = resource_rows.to(per_row.dtype)
    resource = (per_row * weight).sum() / weight.sum().clamp_min(1)
    return tool + resource_coef * resource, tool, resource



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
