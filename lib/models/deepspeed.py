"""DeepSpeed glue for frozen-backbone models: full weights while building, ZeRO-3 leaf MoE blocks that train."""

from __future__ import annotations

import contextlib

import deepspeed
import torch
from deepspeed.utils import z3_leaf_module
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.integrations.deepspeed import (
    deepspeed_config,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)

from lib.models.moe import moe_block_classes


@contextlib.contextmanager
def zero3_init_disabled(training_args=None):
    """Build or load full (unpartitioned) weights even when a ZeRO-3 config is active.

    Upcycling copies the dense MLP into every expert and a model loaded to merge an adapter or to embed texts is
    used whole, which all need the real tensors; DeepSpeed partitions a model when the Trainer builds its engine.
    The active config belongs to ``training_args`` (TrainingArguments hold it; transformers keeps only a weak
    reference), which is put back afterwards.
    """
    if deepspeed_config() is None:
        yield
        return
    plugin = getattr(training_args, "deepspeed_plugin", None)
    owner = getattr(plugin, "dschf", None) or getattr(training_args, "hf_deepspeed_config", None)
    if owner is None:
        raise RuntimeError("zero3_init_disabled needs the TrainingArguments that hold the active DeepSpeed config")
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(owner)


def init_deepspeed_comm_for_zero3() -> None:
    """ZeRO-3 partitions weights while ``from_pretrained`` runs, so DeepSpeed's process group must exist.

    On GPUs the Trainer's arguments set it up; on CPU nothing has yet, and ``zero.Init`` would see one process.
    """
    if is_deepspeed_zero3_enabled() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")


def prepare_moe_for_zero3(model: nn.Module) -> None:
    """Make MoE models with frozen parts (router-only training) trainable under DeepSpeed ZeRO-3.

    Call after freezing and before training. Two things are needed:

    1. MoE blocks must be ZeRO-3 *leaf* modules (their experts are fetched as one unit; otherwise the
       data-dependent expert loop hangs or fails). DeepSpeed does this by default only for some families.
    2. DeepSpeed reduces the gradients of trainable parameters inside a leaf in a module *full backward
       hook*, which first sets ``param.grad = zeros_like(param)``. PyTorch fires a full backward hook as soon
       as the gradient w.r.t. the module's *outputs* exists when none of its inputs requires grad. With the
       backbone frozen, the first MoE block's input does not require grad, so the hook runs before ZeRO has
       re-gathered the block's weights: the router's ``.grad`` becomes an empty placeholder-shaped tensor and
       accumulating the real gradient fails ("The size of tensor a (0) must match the size of tensor b").
       Full fine-tuning never sees this because every block input requires grad there.

    The fix makes the leaf block's hidden-state input require grad (a detached copy, so no gradient flows
    into the frozen layers below), which makes PyTorch hold the hook until the block's backward is done.
    """
    classes = moe_block_classes(model)
    if not classes:
        return
    deepspeed.utils.set_z3_leaf_modules(model, classes)

    def input_requires_grad(module, args, kwargs):
        if not torch.is_grad_enabled() or not z3_leaf_module(module):
            return None
        if any(torch.is_tensor(a) and a.requires_grad for a in args):
            return None
        for i, a in enumerate(args):
            if torch.is_tensor(a) and a.is_floating_point():
                # clone() keeps it a non-leaf, so in-place ops on it (router jitter) stay legal.
                return args[:i] + (a.detach().requires_grad_(True).clone(),) + args[i + 1:], kwargs
        return None

    for module in model.modules():
        if type(module) in classes and any(p.requires_grad for p in module.parameters()):
            if not getattr(module, "_sidekit_zero3_hook", False):
                module.register_forward_pre_hook(input_requires_grad, prepend=True, with_kwargs=True)
                module._sidekit_zero3_hook = True

