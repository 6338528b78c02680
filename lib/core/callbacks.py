"""Trainer callbacks: value schedules configured in YAML, a metrics file, a fault-isolating wrapper, and users' own
callbacks named in a recipe."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
from collections.abc import MutableMapping
from typing import Any

from transformers import TrainerCallback

from lib.core.errors import UserError
from lib.core.files import atomic_path

logger = logging.getLogger(__name__)

_EVENTS = [name for name in dir(TrainerCallback) if name.startswith("on_")]


def parse_schedules(spec: Any) -> list[dict]:
    """Validate a schedule list (from YAML or a JSON string).

    Each entry names a value and either anneals it or switches it at an epoch::

        - {name: route_loss_coef, start: 0.0, end: 1.0, from_epoch: 0, to_epoch: 1, kind: linear}
        - {name: aux_loss_coef, value: 0.01, at_epoch: 1}
    """
    if spec in (None, "", []):
        return []
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise UserError(f"--schedule must be a JSON list of schedule entries ({err}).") from err
    if not isinstance(spec, list):
        raise UserError("--schedule must be a list of schedule entries.")
    out = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"schedule entry {i} must be a mapping with a 'name'.")
        if "at_epoch" in entry:
            if "value" not in entry:
                raise UserError(f"schedule entry {i} ({entry['name']}): 'at_epoch' needs a 'value'.")
            out.append({"name": entry["name"], "value": float(entry["value"]), "at_epoch": float(entry["at_epoch"])})
        elif "start" in entry and "end" in entry:
            kind = entry.get("kind", "linear")
            if kind not in ("linear", "cosine"):
                raise UserError(f"schedule entry {i} ({entry['name']}): kind must be linear or cosine, not {kind}.")
            lo, hi = float(entry.get("from_epoch", 0.0)), float(entry.get("to_epoch", 1.0))
            if hi <= lo:
                raise UserError(f"schedule entry {i} ({entry['name']}): to_epoch must be after from_epoch.")
            out.append({"name": entry["name"], "start": float(entry["start"]), "end": float(entry["end"]),
                        "from_epoch": lo, "to_epoch": hi, "kind": kind})
        else:
            raise UserError(
                f"schedule entry {i} ({entry['name']}) needs either start/end (anneal) or value/at_epoch (switch)."
            )
    return out


def schedule_value(entry: dict, epoch: float, initial: float) -> float:
    """The value of one schedule entry at a (fractional) epoch."""
    if "at_epoch" in entry:
        return entry["value"] if epoch >= entry["at_epoch"] else initial
    t = min(1.0, max(0.0, (epoch - entry["from_epoch"]) / (entry["to_epoch"] - entry["from_epoch"])))
    if entry["kind"] == "cosine":
        t = 0.5 - 0.5 * math.cos(math.pi * t)
    return entry["start"] + (entry["end"] - entry["start"]) * t


class ScheduleCallback(TrainerCallback):
    """Sets named values in ``target`` (a dict owned by the trainer) from the epoch before every step.

    The value depends only on the step and epoch counters, so a resumed run follows the same schedule.
    """

    def __init__(self, schedules: list[dict], target: MutableMapping[str, float]):
        unknown = sorted({s["name"] for s in schedules} - set(target))
        if unknown:
            raise UserError(f"schedule names {unknown} are not schedulable; choose from {sorted(target)}.")
        self.schedules = schedules
        self.target = target
        self.initial = dict(target)
        self.steps_per_epoch = 1.0

    def _apply(self, state) -> None:
        epoch = state.global_step / self.steps_per_epoch
        for entry in self.schedules:
            self.target[entry["name"]] = schedule_value(entry, epoch, self.initial[entry["name"]])

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer knows the optimizer steps per epoch only once its dataloader exists.
        self.steps_per_epoch = max(1.0, state.max_steps / max(1e-9, float(state.num_train_epochs or 1)))
        self._apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)


class MetricsFileCallback(TrainerCallback):
    """Writes every log line to ``<output_dir>/metrics.jsonl`` for users without a tracker.

    A new run starts the file afresh; a resumed run keeps the lines up to its checkpoint's step and drops the rest,
    so the file always describes one run.
    """

    def _path(self, args) -> str:
        return os.path.join(args.output_dir, "metrics.jsonl")

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self._path(args)
        kept = []
        if state.global_step > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= state.global_step:
                            kept.append(line)
                    except ValueError:
                        continue  # a line cut short by a crash
        os.makedirs(args.output_dir, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(self._path(args), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")


class SafeCallback(TrainerCallback):
    """Wraps an optional callback so an exception in it warns (once per event) instead of ending training."""

    def __init__(self, inner: TrainerCallback):
        self.inner = inner
        self._warned: set[str] = set()
        for event in _EVENTS:
            setattr(self, event, self._wrap(event))

    def _wrap(self, event: str):
        def call(args, state, control, **kwargs):
            try:
                return getattr(self.inner, event)(args, state, control, **kwargs)
            except Exception as err:  # noqa: BLE001 - isolating optional callbacks is the point
                if event not in self._warned:
                    self._warned.add(event)
                    logger.warning("optional callback %s failed in %s and is skipped there: %r",
                                   type(self.inner).__name__, event, err)
                return None
        return call

    def __repr__(self) -> str:
        return f"SafeCallback({type(self.inner).__name__})"


def load_user_callbacks(specs: list[str] | None) -> list[TrainerCallback]:
    """Users' own callbacks, named ``module:Class`` (``my_callbacks:PrintLoss``, ``pkg.mod:Class``), each wrapped in
    :class:`SafeCallback` so that a failure inside it never stops training."""
    out = []
    for spec in specs or []:
        for item in (p.strip() for p in str(spec).split(",")):
            if not item:
                continue
            module_name, _, attr = item.partition(":")
            if not module_name or not attr:
                raise UserError(f"--callbacks {item}: name a callback as module:Class (e.g. my_callbacks:PrintLoss).")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise UserError(f"--callbacks {item}: cannot import module '{module_name}' ({err}); put it on "
                                "PYTHONPATH or in the folder you run the script from.") from None
            cls = getattr(module, attr, None)
            if cls is None:
                raise UserError(f"--callbacks {item}: module '{module_name}' has no '{attr}'.")
            callback = cls() if isinstance(cls, type) else cls
            if not isinstance(callback, TrainerCallback):
                raise UserError(f"--callbacks {item} is not a transformers.TrainerCallback (subclass it).")
            out.append(SafeCallback(callback))
    return out


class ProgressBarPostfix(TrainerCallback):
    """Shows ``describe()`` (e.g. a gate's value, ``α=0.0123``) after the training progress bar, every step."""

    def __init__(self, callback_handler, describe):
        self.handler = callback_handler
        self.describe = describe
        self.progress = None

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.trainer_callback import ProgressCallback

        self.progress = next((c for c in self.handler.callbacks if isinstance(c, ProgressCallback)), None)

    def on_step_end(self, args, state, control, **kwargs):
        bar = getattr(self.progress, "training_bar", None)
        if bar is not None:
            bar.set_postfix_str(self.describe(), refresh=False)
