"""sidekit's library: one package per pipeline (selection, sft, eval, tools) over a shared core and models."""

import importlib.util
import os

# DeepSpeed picks its accelerator when first imported and, on a machine without one, warns "Setting accelerator to
# CPU" in every run. Say so up front (which also spares users DS_ACCELERATOR=cpu on CPU-only machines).
if "DS_ACCELERATOR" not in os.environ and importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
