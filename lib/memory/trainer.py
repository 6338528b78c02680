"""The Trainer of the explicit-memory stages: gate cross-entropy, answer LM loss, and the joint terms.

Stage ``gate`` runs the backbone only up to the query layer and trains the gate alone: cross-entropy of the exact
entry scores plus the factorised row and column cross-entropies of the product-key grid (so the sub-keys rank the
gold row and column first). Rows without ``memory_id`` learn from a soft teacher: the frozen model's similarity of
question and entries, kept to its top ``teacher_top_k`` and softened by ``teacher_temperature``.
Stages ``fusion``, ``joint`` and ``memory`` run the whole model and add to the answer-token LM loss, when the gate
trains, the gate cross-entropy on rows with a memory_id and the similarity / diversity terms.
"""

from __future__ import annotations

import contextlib

import deepspeed
import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from lib.core.callbacks import ProgressBarPostfix
from lib.core.trainer import FrozenBackboneTrainer
from lib.memory.data import NO_MEMORY

SCHEDULABLE = ("gate_loss_coef", "similarity_loss_coef", "diversity_loss_coef", "gumbel_temperature", "train_gate")


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions whose next token is an answer token (where the answer is read and predicted)."""
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != -100
    return pos


class MemoryTrainer(FrozenBackboneTrainer):
    """One trainer for the four stages; ``stage`` decides the losses and ``coefs`` holds the schedulable values."""

    def __init__(self, *args, stage: str, save_files=None, query_rows: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self._save_files = save_files
        self._query_rows = query_rows  # gate stage: rows whose frozen query-layer states are computed once
        a = self.args
        self.coefs = {"gate_loss_coef": a.gate_loss_coef, "similarity_loss_coef": a.similarity_loss_coef,
                      "diversity_loss_coef": a.diversity_loss_coef,
                      "gumbel_temperature": a.gumbel_temperature if a.gumbel_temperature is not None else 0.0,
                      "train_gate": a.train_gate}

    def create_optimizer(self, model=None):
        """The usual optimizer, with the fusion gates and null logits in a group of their own learning rate."""
        optimizer = super().create_optimizer(model)
        lr = self.args.fusion_gate_learning_rate
        if lr is None or getattr(optimizer, "_fusion_gates_split", False):
            return optimizer
        gates = [p for n, p in self.model.named_parameters()
                 if p.requires_grad and n.startswith("fusions.") and n.endswith((".alpha", ".null_logit"))]
        ids = {id(p) for p in gates}
        if gates:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": gates, "lr": lr, "weight_decay": 0.0})
        optimizer._fusion_gates_split = True
        return optimizer

    # ---- what a checkpoint holds: every memory part (a frozen gate too: the stage's output needs it) --------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        memory = self.accelerator.unwrap_model(self.model)
        params = [p for n, p in memory.named_parameters() if not n.startswith("backbone.")]
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if is_deepspeed_zero3_enabled() else contextlib.nullcontext())
        with gather:  # a collective under ZeRO-3: every process calls it
            return memory.memory_state()

    def save_component_files(self, output_dir: str) -> None:
        if self._save_files is not None:
            self._save_files(output_dir)

    def get_decay_parameter_names(self, model) -> list[str]:
        # A gate held by train_gate=0 must not move at all: no weight decay for it.
        names = super().get_decay_parameter_names(model)
        return [n for n in names if not n.startswith("gate.")] if self.args.train_gate == 0 else names

    # ---- losses --------------------------------------------------------------------------------------

    def _gate_terms(self, memory, retrieval: dict, positions: torch.Tensor, gold: torch.Tensor,
                    teacher: torch.Tensor | None) -> torch.Tensor:
        """Gate cross-entropy at the answer positions (gold rows), soft-teacher rows, and the gate metrics."""
        b_idx, t_idx = positions.nonzero(as_tuple=True)
        if retrieval["entries"].dim() == 3:  # (B, T, k): select the answer positions
            retrieval = {n: (v if n == "keys" else v[b_idx, t_idx]) for n, v in retrieval.items()}
        q, keys = retrieval["queries"], retrieval["keys"]  # (P, key_dim), (N, key_dim)
        target = gold[b_idx]
        scores = memory.gate.scores(q, keys)  # (P, N)
        has_gold = target != NO_MEMORY
        loss = scores.new_zeros(())
        g = target[has_gold]
        entries = retrieval["entries"][has_gold]
        if len(g):
            side = int(memory.cell_entry.numel() ** 0.5)
            row_keys, col_keys = memory.gate.sub_keys(keys, memory.cells, side)
            rs, cs = memory.gate.half_scores(q[has_gold], row_keys, col_keys)
            cell = memory.cells[g]
            loss = loss + (F.cross_entropy(scores[has_gold], g) + F.cross_entropy(rs, cell // side)
                           + F.cross_entropy(cs, cell % side)) * len(g) / len(target)
        # Recorded on every process even with no gold rows here (count 0): record() is a collective.
        n = len(g)
        self.record("gate/hit@1", (entries[:, 0] == g).float().sum(), n)
        self.record("gate/exhaustive_hit@1", (scores[has_gold].argmax(-1) == g).float().sum(), n)
        self.record(f"gate/hit@{entries.shape[-1]}", (entries == g[:, None]).any(-1).float().sum(), n)
        if teacher is not None and (~has_gold).any():
            soft = teacher[b_idx][~has_gold]
            loss = loss + -(soft * scores[~has_gold].log_softmax(-1)).sum(-1).mean() * (~has_gold).sum() / len(target)
        probs = retrieval["scores"].masked_fill(~retrieval["valid"], -1e4).softmax(-1)
        self.record("gate/entropy", -(probs * probs.clamp_min(1e-12).log()).sum(-1).sum(), len(b_idx))
        return loss

    def _store_query_states(self, memory) -> None:
        """Compute the rows' query-layer states at the first call: inside training, where a backbone that ZeRO-3
        partitioned can run (every process calls it at the same step, with the same rows)."""
        if self._query_rows is None:
            return
        rows, self._query_rows = self._query_rows, None
        memory.stored_query_states = memory.query_states(rows, batch_size=self.args.per_device_eval_batch_size)
        if self.is_world_process_zero():
            size = sum(t.numel() * t.element_size() for t in memory.stored_query_states.values())
            print(f"\nquery-layer states of {len(rows)} rows computed once, kept in memory ({size / 2**20:.0f} MB)",
                  flush=True)

    def _teacher(self, memory, inputs) -> torch.Tensor | None:
        """Soft targets ``(B, N)`` for rows without memory_id, from the frozen model's similarity (None if all
        rows have one)."""
        gold = inputs["memory_index"]
        if (gold != NO_MEMORY).all():
            return None
        q_layer = memory.memory_config.query_layer
        with torch.no_grad(), memory.memory_off():
            hidden = memory.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     output_hidden_states=True, use_cache=False).hidden_states[q_layer]
            mask = (inputs["labels"] == -100) & inputs["attention_mask"].bool()  # the question, not the answer
            question = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            entries = memory.entry_features(q_layer)
            emask = memory.features.mask[..., None].to(entries.dtype)
            entry_vec = (entries * emask).sum(1) / emask.sum(1).clamp_min(1)
            sim = F.normalize(question.float(), dim=-1) @ F.normalize(entry_vec.float(), dim=-1).T
            k = min(self.args.teacher_top_k, sim.shape[-1])
            top, idx = sim.topk(k, dim=-1)
            target = torch.zeros_like(sim).scatter(-1, idx, torch.softmax(top / self.args.teacher_temperature, -1))
        return target

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        memory = self.accelerator.unwrap_model(model)
        gold = inputs["memory_index"]
        positions = answer_positions(inputs["labels"]) & inputs["attention_mask"].bool()
        gate_trains = self.stage != "fusion" and memory.retrieval == "gate" and self.coefs["train_gate"] > 0
        temperature = self.coefs["gumbel_temperature"]
        memory.gumbel_temperature = temperature if temperature > 0 else None
        if self.stage == "gate":
            self._store_query_states(memory)
            retrieval = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              gate_positions=positions)
            loss = self._gate_terms(memory, retrieval, positions, gold, self._teacher(memory, inputs))
            self.record("loss/gate", loss.detach())
            return (loss, None) if return_outputs else loss
        memory.train_gate = gate_trains
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "labels": inputs["labels"]}
        gold_rows = gold.clamp_min(0) if memory.retrieval == "gold" else None
        outputs = model(**batch, memory_index=gold_rows)
        loss = outputs.loss
        self.record("loss/lm", loss.detach())
        if memory.retrieval == "gate" and memory.active:
            retrieval = memory.last_retrieval
            if gate_trains and self.coefs["gate_loss_coef"] > 0:
                gate_loss = self._gate_terms(memory, retrieval, positions, gold, None)
                loss = loss + self.coefs["gate_loss_coef"] * gate_loss
            elif not gate_trains:
                self._gate_terms(memory, {k: v.detach() for k, v in retrieval.items()}, positions, gold, None)
            if gate_trains and (self.coefs["similarity_loss_coef"] or self.coefs["diversity_loss_coef"]):
                b_idx, t_idx = positions.nonzero(as_tuple=True)
                q = F.normalize(retrieval["queries"][b_idx, t_idx], dim=-1)
                entries = retrieval["entries"][b_idx, t_idx]
                chosen = F.normalize(retrieval["keys"].index_select(0, entries.flatten()).view(*entries.shape, -1),
                                     dim=-1)  # (P, k, D)
                similarity = -(q[:, None, :] * chosen[:, :1]).sum(-1).mean()
                pair = chosen @ chosen.transpose(1, 2)
                k = pair.shape[-1]
                diversity = (pair.sum((1, 2)) - pair.diagonal(dim1=1, dim2=2).sum(-1)).mean() / max(k * (k - 1), 1)
                loss = loss + self.coefs["similarity_loss_coef"] * similarity \
                    + self.coefs["diversity_loss_coef"] * diversity
                self.record("loss/similarity", similarity.detach())
                self.record("loss/diversity", diversity.detach())
        held = [p for p in memory.gate.parameters() if p.requires_grad] if not gate_trains else []
        if held:  # a held gate still gets a (zero) gradient, which DDP and ZeRO expect of every trained parameter
            loss = loss + 0.0 * sum(p.sum() for p in held)
        for layer, fusion in memory.fusions.items():
            if fusion.last_gate is not None:  # tanh(alpha) as the last forward used it
                self.record(f"fusion/alpha/{layer}", fusion.last_gate)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class RefreshPlacement(TrainerCallback):
    """While the gate trains its keys move, and a grid placed by old keys groups the wrong entries: place them
    again every ``every`` steps (a fraction of a second for thousands of entries) and before every epoch."""

    def __init__(self, memory, every: int):
        self.memory = memory
        self.every = every

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.memory.refresh_placement()

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.memory.refresh_placement()

    def on_train_end(self, args, state, control, **kwargs):
        self.memory.refresh_placement()


def alpha_summary(memory) -> str:
    """tanh(alpha) of the fusion layers for the progress bar: each layer when there are few, else mean and range."""
    gates = {layer: f.last_gate.item() for layer, f in memory.fusions.items() if f.last_gate is not None}
    if len(gates) <= 3:
        return " ".join(f"α{layer}={g:.4f}" for layer, g in gates.items())
    values = list(gates.values())
    return f"α mean {sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


class AlphaInProgressBar(ProgressBarPostfix):
    """Shows tanh(alpha) of the fusion layers in the progress bar (``α12=0.0123 α20=0.0040``, or mean and range)."""

    def __init__(self, memory, callback_handler):
        super().__init__(callback_handler, lambda: alpha_summary(memory))
