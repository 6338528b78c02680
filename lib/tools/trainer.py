"""Trainer for the tool/resource encoder: queries (frozen LLM embeddings) against gated tool vectors."""

from __future__ import annotations

import os

import numpy as np
import torch

from lib.core.callbacks import ProgressBarPostfix
from lib.core.trainer import FrozenBackboneTrainer
from lib.tools.losses import group_loss, residual_logits, tool_encoder_loss, tool_logits
from lib.tools.modules import QueryAdaptedEncoder, ToolEncoder


class EncoderTrainer(FrozenBackboneTrainer):
    """Cross-entropy over all tools, plus the resource-only term on resource-dependent queries, plus (with
    ``tool_groups``, one id per tool) a cross-entropy of each query against the tools of its target's group.
    ``tool_weights`` (one per tool) weigh the training rows of the tool term by their tool. The model is a
    :class:`ToolEncoder` (batches carry frozen ``query_emb``) or a :class:`QueryAdaptedEncoder` (batches carry
    the prompted queries' ``input_ids``; its adapters train at ``--query_learning_rate``)."""

    def __init__(self, *args, tool_groups: torch.Tensor | None = None, tool_weights: torch.Tensor | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_groups = tool_groups
        self.tool_weights = tool_weights

    def tool_encoder(self, model=None) -> ToolEncoder:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model.tools if isinstance(model, QueryAdaptedEncoder) else model

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        # The semantic table and the resource features are buffers: small, and needed to use the encoder (the
        # LLM's own buffers, e.g. rotary frequencies, are not).
        tensors = super().checkpoint_tensors()
        model = self.accelerator.unwrap_model(self.model)
        prefix = "tools." if isinstance(model, QueryAdaptedEncoder) else ""
        tensors.update({prefix + n: b.detach().cpu().clone().contiguous()
                        for n, b in self.tool_encoder().named_buffers()})
        return tensors

    def save_component_files(self, output_dir: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, QueryAdaptedEncoder):  # the query adapter also in PEFT's own format
            model.query_llm.save_pretrained(os.path.join(output_dir, "query_adapter"))

    def create_optimizer(self, model=None):
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.optimizer is None and isinstance(model, QueryAdaptedEncoder):
            # AdamW as the Trainer builds it, with the query adapters at their own (much smaller) learning rate
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            decay = set(self.get_decay_parameter_names(model))
            groups = []
            for adapter in (False, True):
                for with_decay in (True, False):
                    params = [p for n, p in model.named_parameters() if p.requires_grad
                              and n.startswith("query_llm.") == adapter and (n in decay) == with_decay]
                    if params:
                        groups.append({"params": params, "weight_decay": self.args.weight_decay if with_decay else 0.0,
                                       **({"lr": self.args.query_learning_rate} if adapter else {})})
            self.optimizer = optimizer_cls(groups, **kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _scores(self, model, inputs):
        encoder = self.tool_encoder(model)
        if "input_ids" in inputs:
            query, tools, residual = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        else:
            tools, residual = model()
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
        self.record("gate/alpha", encoder.last_alpha)
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
        super().__init__(callback_handler, lambda: f"α={encoder.last_alpha.item():.4f}")
