"""Router-training losses (pure functions). Router logits come as one ``(tokens, num_experts)`` tensor per layer
(padding rows included); ``token_mask`` is a ``(tokens,)`` bool tensor that is False on padding. Everything is
computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    # The clamp keeps an all-padding batch at 0 instead of NaN; the graph stays connected for backward.
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def garbage_log_mass(logits: torch.Tensor, garbage_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log m, log(1 - m))`` per token, where ``m`` is the routing probability on garbage experts.

    Computed as log-sum-exps of log-probabilities, which stays finite when ``m`` is 0 or 1 in fp32.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    log_m = torch.logsumexp(logp[:, garbage_mask], dim=-1)
    log_q = torch.logsumexp(logp[:, ~garbage_mask], dim=-1)
    return log_m, log_q


def routing_loss(
    router_logits: list[torch.Tensor],
    garbage_masks: list[torch.Tensor],
    token_is_garbage: torch.Tensor,
    token_mask: torch.Tensor,
) -> torch.Tensor:
    """Binary cross-entropy of each token's garbage-bin mass against its row label, averaged over layers.

    Garbage tokens are pushed to put their routing mass on the garbage experts (``-log m``), good tokens to
    keep it off them (``-log(1 - m)``); padding is masked.
    """
    losses = []
    for logits, gmask in zip(router_logits, garbage_masks, strict=True):
        log_m, log_q = garbage_log_mass(logits, gmask)
        nll = torch.where(token_is_garbage, -log_m, -log_q)
        losses.append(_masked_mean(nll, token_mask))
    return torch.stack(losses).mean()


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` per layer (padding masked), averaged.

    ``f_e`` is the share of top-k slots routed to expert ``e`` and ``P_e`` its mean routing probability;
    the loss is 1 for perfectly uniform routing (scaled by ``top_k``) and grows as routing collapses.
    """
    losses = []
    weight = token_mask.float()
    n_tokens = weight.sum().clamp_min(1.0)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, top.reshape(-1), weight.repeat_interleave(top_k)
        )
        f = counts / n_tokens
        p = (probs * weight[:, None]).sum(0) / n_tokens
        losses.append(num_experts * (f * p).sum())
    return torch.stack(losses).mean()


def routing_entropy(router_logits: list[torch.Tensor], token_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the routing distribution over layers, padding masked."""
    values = []
    for logits in router_logits:
        logp = F.log_softmax(logits.float(), dim=-1)
        values.append(_masked_mean(-(logp.exp() * logp).sum(-1), token_mask))
    return torch.stack(values).mean()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (0 when there are none)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
        reduction="sum",
    )
    count = (shift_labels != -100).sum()
    return total / count.clamp_min(1)

