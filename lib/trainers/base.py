"""The frozen-backbone Trainer: per-batch losses, extra metrics through the Trainer's log path."""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from lib.errors import UserError
from lib.files import atomic_path

# The trained components of a checkpoint, under their in-memory parameter names.
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"


def adapt_to_cpu_only_machines(args: TrainingArguments) -> None:
    """Settings that make any TrainingArguments work on CPU-only machines under torchrun and DeepSpeed.

    Call at the start of ``__post_init__``, before TrainingArguments sets up the distributed state.
    """
    if not torch.cuda.is_available():
        # Pinned memory only helps host-to-GPU copies; on CPU it just warns.
        args.dataloader_pin_memory = False
        if args.deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Without use_cpu, a CPU-only launch is not recognised as distributed: every process would
            # silently train alone (torchrun) or DeepSpeed would count the wrong number of processes.
            args.use_cpu = True


class FrozenBackboneTrainingArguments(TrainingArguments):
    """TrainingArguments that also work on CPU-only machines under torchrun and DeepSpeed."""

    def __post_init__(self):
        adapt_to_cpu_only_machines(self)
        super().__post_init__()


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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._pop_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = model.state_dict()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        tensors = {n: state_dict[n].detach().cpu().contiguous() for n in names if n in state_dict}
        with atomic_path(os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS_NAME)
        if not os.path.exists(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        params = dict(model.named_parameters())
        tensors = load_file(path)
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
        unexpected = sorted(n for n in tensors if n not in params)
        reshaped = sorted(f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}" for n, t in tensors.items()
                          if n in params and tuple(t.shape) != tuple(getattr(params[n], "ds_shape", params[n].shape)))
        if missing or unexpected or reshaped:
            problems = [f"{label} {names[:3]}" for label, names in
                        (("missing", missing), ("unexpected", unexpected), ("different shapes", reshaped)) if names]
            raise UserError(
                f"{resume_from_checkpoint} does not match this model ({'; '.join(problems)}); resume with the model "
                "and settings that wrote it."
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].dtype))
