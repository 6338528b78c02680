"""Trainer for the tool/resource encoder: queries (frozen LLM embeddings) against gated tool vectors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from lib.errors import UserError
from lib.losses import residual_logits, tool_encoder_loss, tool_logits
from lib.trainers.base import FrozenBackboneTrainer, FrozenBackboneTrainingArguments


@dataclass
class EncoderTrainingArguments(FrozenBackboneTrainingArguments):
    pooling: str = field(default="mean", metadata={"help": "How the LLM's hidden states become one vector.",
                                                   "choices": ["mean", "last"]})
    d_resource: int | None = field(default=None, metadata={"help": "Width of the resource MLP (null: hidden size)."})
    num_attention_heads: int = field(default=8, metadata={"help": "Heads of the fusion's attention."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout inside the fusion's attention."})
    temperature: float = field(default=0.05, metadata={"help": "Softmax temperature of the cosine scores."})
    resource_loss_coef: float = field(
        default=1.0, metadata={"help": "Weight of the resource-only term on resource-dependent queries."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Queries per device per step."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps (gate/alpha every step by default)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate held-out queries."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the precomputed query embeddings."})

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}.")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.d_resource is not None and self.d_resource < 1:
            raise UserError(f"--d_resource must be positive or null, got {self.d_resource}.")


class EncoderTrainer(FrozenBackboneTrainer):
    """Cross-entropy over all tools, plus the resource-only term on resource-dependent queries."""

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
        loss, tool_ce, resource_ce = tool_encoder_loss(logits, res, target, resource_rows,
                                                       self.args.resource_loss_coef)
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


class GateInProgressBar(TrainerCallback):
    """Shows the gate value in the training progress bar (``α=0.0123``)."""

    def __init__(self, encoder, callback_handler):
        self.encoder = encoder
        self.handler = callback_handler
        self.progress: ProgressCallback | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = next((c for c in self.handler.callbacks if isinstance(c, ProgressCallback)), None)

    def on_step_end(self, args, state, control, **kwargs):
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None:
            bar.set_postfix_str(f"α={self.encoder.alpha.item():.4f}", refresh=False)


@torch.no_grad()
def evaluate_tool_encoder(encoder, dataset, temperature: float) -> dict[str, float]:
    """Held-out top-1/top-3 of ``encoder`` as it is now, without a Trainer (``eval_``-prefixed, like the Trainer's)."""
    from transformers import EvalPrediction

    was_training = encoder.training
    encoder.eval()
    tools, _ = encoder()
    query = torch.tensor(dataset["query_emb"], dtype=torch.float32, device=tools.device)
    logits = tool_logits(query, tools, encoder.center, temperature).cpu().numpy()
    labels = np.stack([np.asarray(dataset["tool"]), np.asarray(dataset["resource"])], axis=1)
    encoder.train(was_training)
    metrics = encoder_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    return {f"eval_{k}": v for k, v in metrics.items()} | {"eval_gate/alpha": encoder.alpha.item()}


class Step0Evaluation(TrainerCallback):
    """Logs the held-out accuracy of the untrained encoder (pure semantics) as step 0 of the run's history.

    Done inside training, through the Trainer's log path, so trackers and ``log_history`` both keep it, and
    without the Trainer's evaluation loop, which DeepSpeed only allows before training under ZeRO-3.
    """

    def __init__(self, trainer, metrics: dict[str, float]):
        self.trainer, self.metrics = trainer, metrics

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.trainer.log(dict(self.metrics))
