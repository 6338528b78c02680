"""Router-only MoE training: separate good rows from garbage by where the routers send them."""

from __future__ import annotations

import json
import logging
import os

import torch
from transformers import TrainerCallback

from lib.core.cards import write_model_card
from lib.core.errors import UserError
from lib.core.trainer import FrozenBackboneTrainer
from lib.models.moe import RouterCapture, RouterInfo
from lib.selection.losses import (
    causal_lm_loss,
    load_balancing_loss,
    routing_entropy,
    routing_loss,
)
from lib.selection.scores import (
    auroc,
    expert_slot_counts,
    garbage_mass_per_token,
    row_garbage_mass,
)
from lib.selection.split import (
    ROUTER_CONFIG_NAME,
    ExpertSplit,
    load_router_config,
    save_router_config,
)

logger = logging.getLogger(__name__)


class _ProbeCallback(TrainerCallback):
    """Runs garbage_selection=probe once the model is wrapped (so ZeRO-3 gathers weights for it)."""

    def __init__(self, trainer: "RouterTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.split is None:
            self.trainer.split = self.trainer.probe_split()


class RouterTrainer(FrozenBackboneTrainer):
    """Trains router weights with LM loss on good rows + routing loss + load balancing.

    ``routers`` come from :func:`lib.models.moe.find_moe_routers`; ``split`` says which experts are garbage
    bins (None with ``garbage_selection=probe``: it is computed on ``probe_dataset`` at train start).
    ``router_config_extra`` is recorded in every checkpoint's ``router_config.json``.
    """

    def __init__(self, *args, routers: list[RouterInfo], split: ExpertSplit | None = None,
                 probe_dataset=None, router_config_extra: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.routers = routers
        self.split = split
        self.probe_dataset = probe_dataset
        self.router_config_extra = router_config_extra or {}
        self.coefs = {
            "lm_loss_coef": self.args.lm_loss_coef,
            "route_loss_coef": self.args.route_loss_coef,
            "aux_loss_coef": self.args.aux_loss_coef,
        }
        if split is None:
            if probe_dataset is None:
                raise UserError("RouterTrainer needs an expert split or a probe dataset to compute one.")
            self.add_callback(_ProbeCallback(self))

    # ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str) and os.path.exists(os.path.join(resume_from_checkpoint, ROUTER_CONFIG_NAME)):
            # A probe split was computed on the untrained routers: reuse it, never recompute it mid-run.
            self.split = ExpertSplit.from_dict(load_router_config(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @torch.no_grad()
    def probe_split(self) -> ExpertSplit:
        """Per layer, rank experts by how much more garbage than good probe tokens pick them (top-k slots)."""
        model = self.model
        was_training = model.training
        model.eval()
        device = self.accelerator.device
        shares = {0: None, 1: None}
        for quality in (0, 1):
            rows = [r for r in self.probe_dataset if r["quality"] == quality][: self.args.probe_samples]
            if not rows:
                continue
            counts = torch.zeros(len(self.routers), self.routers[0].num_experts)
            bs = self.args.per_device_eval_batch_size
            for i in range(0, len(rows), bs):
                keys = [k for k in ("input_ids", "attention_mask", "score_mask") if k in rows[0]]
                batch = self.data_collator([{k: r[k] for k in keys} for r in rows[i:i + bs]])
                batch = {k: v.to(device) for k, v in batch.items()}
                scored = batch.pop("score_mask", batch["attention_mask"])
                with RouterCapture(self.routers) as cap:
                    model(**batch, use_cache=False, logits_to_keep=1)
                counts += expert_slot_counts(cap.logits, scored, self.routers[0].top_k)
            shares[quality] = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        if shares[0] is None:
            raise UserError("garbage_selection=probe needs garbage rows (label 0 or --synthetic_negatives).")
        model.train(was_training)
        split = ExpertSplit.by_probe(self.routers, self.args.garbage_expert_ratio, shares[0], shares[1])
        logger.warning("probe expert split (layer: garbage experts): %s", split.garbage_experts)
        return split

    # ---------------------------------------------------------------------------------------------
    def _losses(self, model, inputs):
        quality = inputs.pop("quality")
        labels = inputs.pop("labels")
        attention_mask = inputs["attention_mask"]
        scored = inputs.pop("score_mask", None)  # --score_tokens assistant: the tokens routing is trained on
        scored = attention_mask if scored is None else scored
        local = self.args.router_gradient == "local"
        need_lm = self.coefs["lm_loss_coef"] > 0 and not local
        with RouterCapture(self.routers, detach=local) as cap:
            # Without an LM term, the LM head is only run on the last position.
            outputs = model(**inputs, use_cache=False, logits_to_keep=0 if need_lm else 1)
        masks = self.split.masks(attention_mask.device)
        token_mask = scored.reshape(-1).bool()
        token_is_garbage = (quality == 0)[:, None].expand_as(attention_mask).reshape(-1)
        route = routing_loss(cap.logits, masks, token_is_garbage, token_mask)
        aux = load_balancing_loss(cap.logits, self.split.top_k, token_mask)
        lm = causal_lm_loss(outputs.logits, labels) if need_lm else route.new_zeros(())
        loss = self.coefs["lm_loss_coef"] * lm + self.coefs["route_loss_coef"] * route + self.coefs["aux_loss_coef"] * aux
        with torch.no_grad():
            mass = garbage_mass_per_token(cap.logits, masks).mean(0)
            good_tok = token_mask & ~token_is_garbage
            bad_tok = token_mask & token_is_garbage
            n_lm = (labels[:, 1:] != -100).sum()
            self.record("loss/lm", lm.detach() * n_lm, n_lm)
            self.record("loss/route", route.detach())
            self.record("loss/aux", aux.detach())
            self.record("router/entropy", routing_entropy(cap.logits, token_mask))
            self.record("router/garbage_mass_good", mass[good_tok].sum(), good_tok.sum())
            self.record("router/garbage_mass_bad", mass[bad_tok].sum(), bad_tok.sum())
            row_mass = row_garbage_mass(cap.logits, masks, scored)
        return loss, row_mass, quality

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, row_mass, quality = self._losses(model, dict(inputs))
        return (loss, {"row_garbage_mass": row_mass, "quality": quality}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, row_mass, quality = self._losses(model, dict(inputs))
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), row_mass.detach(), quality.detach()

    def log(self, logs, start_time=None):
        if self.args.schedule and self.model.training:
            logs = {**logs, **{f"coef/{k.removesuffix('_loss_coef')}": v for k, v in self.coefs.items()}}
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------------
    def save_component_files(self, output_dir: str) -> None:
        if self.split is not None:
            save_router_config(output_dir, self.split, self.routers, {
                "garbage_expert_ratio": self.args.garbage_expert_ratio,
                **self.router_config_extra,
            })
        self._write_model_card(output_dir)

    def create_model_card(self, *args, **kwargs):
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir)

    def _write_model_card(self, output_dir: str) -> None:
        extra = self.router_config_extra
        base = extra.get("base_model", "")
        last_eval = next((h for h in reversed(self.state.log_history) if "eval_router/auroc" in h), None)
        split = json.dumps(self.split.garbage_experts) if self.split else "computed at train start"
        lines = [
            "Only the router weights were trained (everything else frozen) so that routing separates good rows",
            "from garbage: garbage rows are pushed onto the garbage-bin experts, good rows away from them.",
            "Score data with `select_data.py --router_model <this folder>`: it rebuilds the model from the base model",
            "(upcycled as below) and the trained routers in `trainable.safetensors`.",
            "",
            f"- base model: `{base}`" + (f" (revision {extra['base_model_revision']})"
                                         if extra.get("base_model_revision") else ""),
            f"- upcycled: {json.dumps(extra.get('upcycle')) if extra.get('upcycle') else 'no'}",
            f"- garbage-bin experts per layer ({self.args.garbage_selection}): {split}",
            f"- tokens routing is trained on and rows are scored by: "
            f"{extra.get('scoring', {}).get('score_tokens') or 'all'}",
            f"- loss coefficients: lm {self.args.lm_loss_coef}, route {self.args.route_loss_coef}, "
            f"aux {self.args.aux_loss_coef}; router gradients: {self.args.router_gradient}",
            f"- epochs {self.args.num_train_epochs}, learning rate {self.args.learning_rate}, "
            f"batch {self.args.per_device_train_batch_size} per device, seed {self.args.seed}",
        ]
        if last_eval:
            lines.append(f"- held-out AUROC of the garbage mass: {last_eval['eval_router/auroc']:.4f}")
        write_model_card(output_dir, title=f"MoE routers trained for data selection on {base or 'an MoE model'}",
                         lines=lines, library_name="transformers", tags=["sidekit", "moe-router", "data-selection"],
                         base_model=base)


def router_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for RouterTrainer: AUROC of the quality score (1 - garbage mass) for good rows."""
    row_mass, quality = eval_pred.predictions, eval_pred.label_ids
    return {"router/auroc": auroc(1.0 - row_mass, quality == 1)}

