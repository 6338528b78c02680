"""The Trainer of the recall model: next-token loss on answer tokens, recorded per kind of row (loss/recall,
loss/qa, loss/sft)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.core.trainer import FrozenBackboneTrainer
from lib.recall.data import TASKS


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of the next token ``(B, T-1)`` and its mask (labels other than -100)."""
    target = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none")
    mask = target != -100
    return losses * mask, mask


class RecallTrainer(FrozenBackboneTrainer):
    """Loss: the mean over every answer token of the batch (recall, QA and instruction rows alike)."""

    def __init__(self, *args, save_files=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._save_files = save_files

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        task = inputs.pop("task")
        at = torch.zeros_like(labels, dtype=torch.bool)
        at[:, :-1] = labels[:, 1:] != -100  # positions whose next token is an answer token
        outputs = model(**inputs, logits_at=at)
        losses = F.cross_entropy(outputs["logits"].float(), labels[:, 1:][at[:, :-1]], reduction="none")
        loss = losses.sum() / max(1, losses.numel())
        row_task = task[at.nonzero()[:, 0]]
        for name, value in TASKS.items():
            mine = row_task == value
            self.record(f"loss/{name}", losses[mine].sum(), mine.sum())
        return (loss, outputs) if return_outputs else loss

    def save_component_files(self, output_dir: str) -> None:
        if self._save_files is not None:
            self._save_files(output_dir)
