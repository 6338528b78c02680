"""Per-row quality scores (pure functions): from router logits, from the LM's own losses, and ranking metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.registry import Registry


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


def router_row_scores(
    router_logits: list[torch.Tensor], garbage_masks: list[torch.Tensor], attention_mask: torch.Tensor, top_k: int
) -> dict[str, torch.Tensor]:
    """Per-row router quality scores of one batch, in fp32 with padding masked.

    ``router_logits``: one ``(batch * seq, E)`` tensor per sparse layer; ``garbage_masks``: one boolean ``(E,)``
    per layer. Returns ``(batch,)`` tensors ``quality_score`` (1 - mean garbage-bin probability mass over layers
    and tokens), ``quality_logodds`` (mean of logsumexp over quality logits minus logsumexp over garbage logits),
    ``routed_share`` (share of top-k slots on quality experts), ``n_tokens``, and ``(batch, layers)``
    ``quality_score_layers``. Rows without tokens get NaN.
    """
    batch, seq = attention_mask.shape
    logits = torch.stack([x.float().reshape(batch, seq, -1) for x in router_logits])  # (L, B, S, E)
    garbage = torch.stack(garbage_masks).to(logits.device)[:, None, None, :]  # (L, 1, 1, E)
    probs = logits.softmax(-1)
    quality_mass = 1.0 - (probs * garbage).sum(-1)  # (L, B, S)
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    logodds = (torch.logsumexp(torch.where(garbage, neg_inf, logits), -1)
               - torch.logsumexp(torch.where(garbage, logits, neg_inf), -1))
    # Top-k of the logits is the top-k of the softmax every supported family routes by.
    chosen = logits.topk(top_k, dim=-1).indices  # (L, B, S, K)
    on_quality = (~garbage.expand_as(logits)).gather(-1, chosen).float().mean(-1)

    mask = attention_mask.to(device=logits.device, dtype=torch.float32)
    n = mask.sum(-1)  # (B,)
    denom = n.clamp_min(1)

    def per_layer(x: torch.Tensor) -> torch.Tensor:  # (L, B, S) -> (L, B)
        return (x * mask).sum(-1) / denom

    nan = torch.full_like(n, float("nan"))
    layers = per_layer(quality_mass)
    out = {
        "quality_score": layers.mean(0),
        "quality_logodds": per_layer(logodds).mean(0),
        "routed_share": per_layer(on_quality).mean(0),
    }
    out = {k: torch.where(n > 0, v, nan) for k, v in out.items()}
    out["quality_score_layers"] = torch.where(n[:, None] > 0, layers.T, nan[:, None])
    out["n_tokens"] = n.long()
    return out


def expert_slot_counts(router_logits: list[torch.Tensor], token_mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(layers, experts)`` how many top-k routing slots each expert receives from the non-padding tokens."""
    counts = []
    for logits in router_logits:
        top = logits.float().topk(top_k, dim=-1).indices[token_mask.reshape(-1).bool()]
        counts.append(torch.bincount(top.reshape(-1).cpu(), minlength=logits.shape[-1]).float())
    return torch.stack(counts)


def masked_mean_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of the targeted tokens of each row, in fp32.

    ``target_mask[b, t] = 1`` makes token ``t`` a target, predicted from positions ``< t`` (so position 0 is
    never a target). ``logits``: ``(batch, seq, vocab)``. Rows without targets get NaN.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = target_mask[:, 1:].to(nll.dtype)
    n = mask.sum(-1)
    out = (nll * mask).sum(-1) / n.clamp_min(1)
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


def finite_or_none(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# --------------------------------------------------------------------------------------------------
# The scores select_data.py ranks by, by name
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Score:
    """A way to rank rows. ``needs``: ``router`` (router logits of a train_router.py checkpoint), ``lm`` (the
    model's own token losses), ``text`` (the rendered rows only, plus labelled rows to train on) or ``hidden`` (the
    model's hidden states, plus labelled rows to train on). ``rank`` turns a scored row's columns into its
    selection_score (higher is better)."""

    name: str
    needs: str
    rank: Callable[[dict[str, Any]], float | None]
    help: str


def _ifd_rank(row: dict[str, Any]) -> float | None:
    # The IFD itself when below 1 (harder instructions first, as in the IFD paper); rows whose answer is no easier
    # with the question than without (IFD >= 1, usually misaligned pairs) rank below all others.
    ifd = row.get("ifd")
    if ifd is None:
        return None
    return ifd if ifd < 1 else -ifd


SCORES = Registry("score")
SCORES.register("quality_score", Score(
    "quality_score", "router", lambda row: row.get("quality_score"),
    "1 - mean garbage-bin routing probability over layers and tokens"))
SCORES.register("quality_logodds", Score(
    "quality_logodds", "router", lambda row: row.get("quality_logodds"),
    "mean logsumexp(quality logits) - logsumexp(garbage logits)"))
SCORES.register("routed_share", Score(
    "routed_share", "router", lambda row: row.get("routed_share"), "share of top-k routing slots on quality experts"))
SCORES.register("perplexity", Score(
    "perplexity", "lm", lambda row: None if row.get("_nll") is None else -row["_nll"],
    "the model's own perplexity, lower first (ranked by -log perplexity)"))
SCORES.register("ifd", Score(
    "ifd", "lm", _ifd_rank,
    "instruction-following difficulty of chat rows: IFD < 1 descending, then IFD >= 1"))
SCORES.register("fasttext", Score(
    "fasttext", "text", lambda row: row.get("fasttext"),
    "P(good) of a fastText classifier trained on labelled rows (DCLM / FineWeb-Edu style)"))
SCORES.register("probe", Score(
    "probe", "hidden", lambda row: row.get("probe"),
    "P(good) of a logistic regression on the model's mean-pooled hidden states, trained on labelled rows"))
ROUTER_SCORES = tuple(n for n in SCORES.names() if SCORES.get(n).needs == "router")
LM_SCORES = tuple(n for n in SCORES.names() if SCORES.get(n).needs == "lm")
BASELINE_SCORES = tuple(n for n in SCORES.names() if SCORES.get(n).needs in ("text", "hidden"))


def selection_score(score: str, row: dict[str, Any]) -> float | None:
    """The value rows are ranked by, higher is better (see each score's ``rank``)."""
    return finite_or_none(SCORES.get(score).rank(row))
