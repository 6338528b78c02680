"""Quality scores (pure functions) computed from router logits, and ranking metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def garbage_mass_per_token(router_logits: list[torch.Tensor], garbage_masks: list[torch.Tensor]) -> torch.Tensor:
    """``(layers, tokens)`` routing probability mass on each layer's garbage experts, in fp32."""
    return torch.stack([
        F.softmax(logits.float(), dim=-1)[:, mask].sum(-1)
        for logits, mask in zip(router_logits, garbage_masks, strict=True)
    ])


def row_garbage_mass(
    router_logits: list[torch.Tensor], garbage_masks: list[torch.Tensor], attention_mask: torch.Tensor
) -> torch.Tensor:
    """``(batch,)`` mean garbage-bin mass over layers and non-padding tokens of each row.

    ``quality_score = 1 - row_garbage_mass``. Rows with no tokens get NaN.
    """
    batch, seq = attention_mask.shape
    mass = garbage_mass_per_token(router_logits, garbage_masks).mean(0).reshape(batch, seq)
    mask = attention_mask.to(mass.dtype)
    n = mask.sum(-1)
    out = (mass * mask).sum(-1) / n.clamp_min(1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 positive, 0 negative), ties averaged.

    Equals the probability that a random positive outscores a random negative (Mann-Whitney U). NaN
    scores are dropped; NaN when either class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    keep = ~np.isnan(scores)
    scores, labels = scores[keep], labels[keep]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average ranks (1-based) over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
