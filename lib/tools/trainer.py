"""Trainer for the tool/resource encoder: queries (frozen LLM embeddings) against gated tool vectors."""

from __future__ import annotations

import numpy as np
import torch

from lib.core.callbacks import ProgressBarPostfix
from lib.core.trainer import FrozenBackboneTrainer
from lib.tools.losses import group_loss, residual_logits, tool_encoder_loss, tool_logits


class EncoderTrainer(FrozenBackboneTrainer):
    """Cross-entropy over all tools, plus the resource-only term on resource-dependent queries, plus (with
    ``tool_groups``, one id per tool) a cross-entropy of each query against the tools of its target's group.
    ``tool_weights`` (one per tool) weigh the training rows of the tool term by their tool."""

    def __init__(self, *args, tool_groups: torch.Tensor | None = None, tool_weights: torch.Tensor | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_groups = tool_groups
        self.tool_weights = tool_weights

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        # The semantic table and the resource features are buffers: small, and needed to use the encoder.
        tensors = super().checkpoint_tensors()
        encoder = self.accelerator.unwrap_model(self.model)
        tensors.update({n: b.detach().cpu().clone().contiguous() for n, b in encoder.named_buffers()})
        return tensors

    def _scores(self, model, inputs):
        tools, residual = model()
        encoder = self.accelerator.unwrap_model(model)
        query = inputs["query_emb"].float()
        logits = tool_logits(query, tools, encoder.center, self.args.temperature)
        res = residual_logits(query, residual, encoder.semantic, encoder.center, self.args.temperature)
        return encoder, logits, res

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        encoder, logits, res = self._scores(model, inputs)
        target, resource_rows = inputs["tool"], inputs["resource"]
        # held-out rows are scored unweighted: eval loss stays the plain cross-entropy
        weight = self.tool_weights.to(logits.device) if self.tool_weights is not None and model.training else None
        loss, tool_ce, resource_ce = tool_encoder_loss(logits, res, target, resource_rows,
                                                       self.args.resource_loss_coef, weight)
        if self.tool_groups is not None and self.args.group_loss_coef:
            group_ce, n_group = group_loss(logits, target, self.tool_groups.to(target.device))
            loss = loss + self.args.group_loss_coef * group_ce
            self.record("loss/group", group_ce.detach() * n_group, n_group.float())
        n = torch.tensor(float(len(target)), device=logits.device)
        self.record("loss/tool", tool_ce.detach() * n, n)
        n_res = resource_rows.float().sum()
        self.record("loss/resource", resource_ce.detach() * n_res, n_res)
        self.record("train/tool_acc" if model.training else "tool_acc",
                    (logits.argmax(-1) == target).float().sum(), n)
        self.record("gate/alpha", encoder.alpha.detach())
        return (loss, logits) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, logits = self.compute_loss(model, inputs, return_outputs=True)
        labels = torch.stack([inputs["tool"], inputs["resource"].long()], dim=1)
        return loss.detach(), logits.detach(), labels


def encoder_metrics(eval_pred) -> dict[str, float]:
    """Top-1 / top-3 tool accuracy of held-out queries, overall and split by query kind."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    target, resource = labels[:, 0], labels[:, 1].astype(bool)
    ranked = np.argsort(-logits, axis=-1)
    top1 = ranked[:, 0] == target
    top3 = (ranked[:, :3] == target[:, None]).any(-1)
    out = {"top1": float(top1.mean()), "top3": float(top3.mean())}
    for name, mask in (("semantic", ~resource), ("resource", resource)):
        if mask.any():
            out[f"top1_{name}"] = float(top1[mask].mean())
            out[f"top3_{name}"] = float(top3[mask].mean())
    return out


class GateInProgressBar(ProgressBarPostfix):
    """Shows the gate value in the training progress bar (``α=0.0123``)."""

    def __init__(self, encoder, callback_handler):
        super().__init__(callback_handler, lambda: f"α={encoder.alpha.item():.4f}")
