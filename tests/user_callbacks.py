"""Callbacks a user names in a recipe (``callbacks: [tests.user_callbacks:RecordSteps]``), for the tests."""

import json
import os

from transformers import TrainerCallback


class RecordSteps(TrainerCallback):
    """Writes the step of every log line to ``<output_dir>/user_callback_steps.json``."""

    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.steps.append(state.global_step)
        with open(os.path.join(args.output_dir, "user_callback_steps.json"), "w", encoding="utf-8") as f:
            json.dump(self.steps, f)


class Broken(TrainerCallback):
    """Fails at every step end: training must go on regardless."""

    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("this plugin is broken")
