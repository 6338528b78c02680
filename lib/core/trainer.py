"""The frozen-backbone Trainer: checkpoints that hold what trained (never the frozen backbone), exact resume, and
per-batch losses and extra metrics through the Trainer's log path."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict

import deepspeed
import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import SCHEDULER_NAME

from lib.core.errors import UserError
from lib.core.files import atomic_path

logger = logging.getLogger(__name__)

# The trained components of a checkpoint, under their in-memory parameter names.
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"


class FrozenBackboneTrainer(Trainer):
    """Base for trainers whose backbone is frozen and whose loss is a sum of named per-batch terms.

    Checkpoints also hold ``trainable.safetensors``: the trained parameters under their in-memory names. Resuming
    loads it strictly, because some architectures (Mixtral) rename weights on disk and the Trainer's own
    non-strict reload of ``model.safetensors`` would silently skip them.

    Subclasses compute their loss in ``compute_loss`` and call :meth:`record` with ``(sum, count)`` pairs;
    ``log`` turns them into means over every process and step since the last log, so W&B, TensorBoard,
    ``log_history`` and the console all see them (``eval_``-prefixed during evaluation).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list), "eval": defaultdict(list)
        }
        # Our losses are means over the micro-batch: let the Trainer divide by the accumulation steps, and
        # do not let it rescale by the number of processes as it does for token-normalised model losses.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def record(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float = 1.0) -> None:
        """Accumulate ``total / count`` for ``name``; sums are gathered across processes before averaging.

        Every process must call ``record`` with the same names in the same order (it is a collective).
        """
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        pair = torch.stack([
            torch.as_tensor(total, dtype=torch.float32, device=device).detach().reshape(()),
            torch.as_tensor(count, dtype=torch.float32, device=device).detach().reshape(()),
        ])
        self._metrics[mode][name].append(self.accelerator.gather(pair).reshape(-1, 2).sum(0).cpu())

    def _pop_metrics(self, mode: str) -> dict[str, float]:
        out = {}
        for name, pairs in self._metrics[mode].items():
            total, count = torch.stack(pairs).sum(0).tolist()
            if count > 0:
                out[name] = total / count
        self._metrics[mode].clear()
        return out

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """As the Trainer's, with what its steps :meth:`record` in the returned metrics: ``predict`` logs nothing,
        and left recorded they would be averaged into the next evaluation's logs."""
        output = super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        recorded = {f"{metric_key_prefix}_{k}": v for k, v in self._pop_metrics("eval").items()}
        return output._replace(metrics={**output.metrics, **recorded})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._pop_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)

    # ---- checkpoints: what trained, not the frozen backbone ------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds, under their in-memory names: the trained parameters (gathered under
        ZeRO-3; a collective, so every process calls it). Subclasses may add small state they need to be usable."""
        model = self.accelerator.unwrap_model(self.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gather = (deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
                  if is_deepspeed_zero3_enabled() else contextlib.nullcontext())
        with gather:
            return {n: p.detach().cpu().clone().contiguous() for n, p in named}

    def save_component_files(self, output_dir: str) -> None:
        """Config files and model card written next to the tensors (subclasses); main process only."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save what trained (``trainable.safetensors``), the tokenizer and the component files, never the frozen
        backbone: a router checkpoint of a 30B MoE model is megabytes, not 60 GB. ``save_full_model`` writes a
        complete transformers checkpoint when one is wanted."""
        output_dir = output_dir or self.args.output_dir
        tensors = self.checkpoint_tensors()
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            with atomic_path(os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME)) as tmp:
                save_file(tensors, tmp, metadata={"format": "pt"})
            if hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(output_dir)
            self.save_component_files(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_full_model(self, output_dir: str | None = None) -> None:
        """A complete transformers checkpoint (backbone included, gathered under ZeRO-3), as the Trainer saves one."""
        Trainer.save_model(self, output_dir, _internal_call=True)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed's own checkpoint would also hold every frozen weight (module states and ZeRO's frozen
        # fragments); they never change, so leave them out. Resuming then loads the module non-strictly
        # (create_scheduler below), which the Trainer itself only does for PEFT models.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        engine = getattr(wrapped, "engine", None)
        if engine is not None and not getattr(engine, "_sidekit_nonstrict_load", False):
            load_checkpoint = engine.load_checkpoint

            def load_without_frozen(*args, **kwargs):
                kwargs["load_module_strict"] = False
                return load_checkpoint(*args, **kwargs)

            engine.load_checkpoint = load_without_frozen
            engine._sidekit_nonstrict_load = True
        return scheduler

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.load_checkpoint_tensors(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        self.load_checkpoint_tensors(self.state.best_model_checkpoint)

    def load_checkpoint_tensors(self, checkpoint: str, model=None) -> None:
        """Load ``trainable.safetensors`` strictly: every trained tensor present, nothing unknown, same shapes.

        Strictly, because some architectures (Mixtral) rename weights on disk and a non-strict reload of a full
        checkpoint would silently skip them.
        """
        path = os.path.join(checkpoint, TRAINABLE_WEIGHTS_NAME)
        if not os.path.exists(path):
            raise UserError(f"{checkpoint} has no {TRAINABLE_WEIGHTS_NAME}; resume from a checkpoint-N folder written "
                            "by this script.")
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        tensors = load_file(path)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(trained - set(tensors))
        unexpected = sorted(n for n in tensors if n not in state)
        reshaped = sorted(f"{n} {tuple(t.shape)} vs {tuple(state[n].shape)}" for n, t in tensors.items()
                          if n in state and tuple(t.shape) != tuple(getattr(state[n], "ds_shape", state[n].shape)))
        if missing or unexpected or reshaped:
            problems = [f"{label} {names[:3]}" for label, names in
                        (("missing", missing), ("unexpected", unexpected), ("different shapes", reshaped)) if names]
            raise UserError(f"{checkpoint} does not match this model ({'; '.join(problems)}); resume with the model "
                            "and settings that wrote it.")
        params = [state[n] for n in tensors if n in trained]
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=0)
                  if is_deepspeed_zero3_enabled() else contextlib.nullcontext())
        with gather, torch.no_grad():
            for name, tensor in tensors.items():
                if name in trained or not hasattr(state[name], "ds_shape"):  # frozen ZeRO-3 shards stay as built
                    state[name].copy_(tensor.to(state[name].dtype))
