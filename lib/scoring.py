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


# --------------------------------------------------------------------------------------------------
# The batched scorer
# --------------------------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised from the last router's hook: nothing after it is needed for router scores."""


class BatchScorer:
    """Runs the minimal forward pass a score needs and returns per-row scores of one padded batch.

    Router scores need every sparse layer's router logits and nothing after the last router, so the forward
    pass stops there: the last sparse layer's experts, any later layers, the final norm and the LM head never
    run. Perplexity-style scores (``lm=True``) run the backbone to its last hidden state and apply the LM head
    row by row, so the ``(tokens, vocab)`` log-probabilities of a whole batch never exist at once.
    """

    def __init__(self, model, *, routers=None, garbage_masks=None, top_k: int = 1, lm: bool = False):
        self.model = model
        self.routers = routers or []
        self.garbage_masks = garbage_masks
        self.top_k = top_k
        self.lm = lm
        self._head_checked = False
        self._head_is_exact = True
        if not self.routers and not lm:
            raise ValueError("BatchScorer needs routers, lm=True, or both")

    def _stop(self, module, inputs, output):
        raise _StopForward

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from lib.models.moe import RouterCapture

        out: dict[str, torch.Tensor] = {}
        if self.lm and not self._head_checked:
            self._check_head(input_ids, attention_mask)
        capture = RouterCapture(self.routers)
        try:
            with capture:
                if self.lm:
                    nll = self._nll(input_ids, attention_mask,
                                    attention_mask if target_mask is None else target_mask)
                else:
                    # Registered after the capture hooks, so it fires once the last logits are recorded.
                    stop = self.routers[-1].module.register_forward_hook(self._stop)
                    try:
                        self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    finally:
                        stop.remove()
        except _StopForward:
            pass
        if self.routers:
            if len(capture.logits) != len(self.routers):
                raise RuntimeError(f"captured {len(capture.logits)} router outputs, expected {len(self.routers)}")
            out.update(router_row_scores(capture.logits, self.garbage_masks, attention_mask, self.top_k))
        if self.lm:
            out["nll"] = nll
        return out

    def _row_logits(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden[i:i + 1])
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return softcap * torch.tanh(logits / softcap) if softcap else logits

    def _check_head(self, input_ids, attention_mask) -> None:
        """Families with extra logit transforms would make the row-wise head differ from the model's own
        logits; check once on one row and use the full forward pass from then on if so."""
        self._head_checked = True
        model = self.model
        ref = model(input_ids=input_ids[:1], attention_mask=attention_mask[:1], use_cache=False).logits
        hidden = model.base_model(input_ids=input_ids[:1], attention_mask=attention_mask[:1], use_cache=False)[0]
        n = int(attention_mask[0].sum())
        mine = self._row_logits(hidden, 0)
        self._head_is_exact = torch.allclose(mine[:, :n].float(), ref[:, :n].float(), rtol=1e-3, atol=1e-3)

    def _nll(self, input_ids, attention_mask, target_mask) -> torch.Tensor:
        if not self._head_is_exact:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return masked_mean_nll(logits, input_ids, target_mask)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return torch.cat([
            masked_mean_nll(self._row_logits(hidden, i), input_ids[i:i + 1], target_mask[i:i + 1])
            for i in range(len(input_ids))
        ])
