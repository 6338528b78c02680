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
    """Loss: the mean over every answer token of the batch (recall, QA and instruction rows alike). With
    ``sft_loss="kl"`` an instruction row's token counts KL(base || model) instead of its cross-entropy: the base
    model's next-token distribution (the same model with its LoRA off) is the target, so those rows keep the model
    near its old behaviour rather than teaching it the rows' text."""

    def __init__(self, *args, save_files=None, sft_loss: str = "kl", **kwargs):
        super().__init__(*args, **kwargs)
        if sft_loss not in ("ce", "kl"):
            raise ValueError(f"sft_loss must be 'ce' or 'kl', got {sft_loss!r}")
        self._save_files = save_files
        self._sft_loss = sft_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        task = inputs.pop("task")
        at = torch.zeros_like(labels, dtype=torch.bool)
        at[:, :-1] = labels[:, 1:] != -100  # positions whose next token is an answer token
        outputs = model(**inputs, logits_at=at)
        losses = F.cross_entropy(outputs["logits"].float(), labels[:, 1:][at[:, :-1]], reduction="none")
        row_task = task[at.nonzero()[:, 0]]
        general = row_task == TASKS["sft"]
        if self._sft_loss == "kl" and bool(general.any()):
            kl = self._kl_to_base(model, inputs, at, task == TASKS["sft"], outputs["logits"][general])
            losses = losses.masked_scatter(general, kl)
        loss = losses.sum() / max(1, losses.numel())
        for name, value in TASKS.items():
            mine = row_task == value
            self.record(f"loss/{name}", losses[mine].sum(), mine.sum())
        return (loss, outputs) if return_outputs else loss

    def _kl_to_base(self, model, inputs: dict, at: torch.Tensor, rows: torch.Tensor,
                    logits: torch.Tensor) -> torch.Tensor:
        """KL(base || model) at the ``at`` positions of ``rows`` (``logits``: the model's there, in order)."""
        recall_model = self.accelerator.unwrap_model(model)
        sub = {k: v[rows] for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad(), recall_model.model.disable_adapter():
            base = recall_model(**sub, logits_at=at[rows])["logits"]
        return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(base.float(), -1), log_target=True,
                        reduction="none").sum(-1)

    def save_component_files(self, output_dir: str) -> None:
        if self._save_files is not None:
            self._save_files(output_dir)
