"""MoE routers: finding them in any supported family, capturing their logits, keeping them in fp32."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lib.core.errors import UserError
from lib.core.registry import Registry

# Router kinds train_router.py trains, by name (--router_type). Each entry finds the router modules of a loaded
# model; the explicit-memory pipeline registers its MemoryGate here.
ROUTERS = Registry("router type")

# Softmax top-k routers of the MoE families we support; their forward returns (logits, scores, indices).
ROUTER_CLASSES = frozenset({
    "MixtralTopKRouter",
    "Qwen2MoeTopKRouter",
    "Qwen3MoeTopKRouter",
    "OlmoeTopKRouter",
})

# The block that owns a router and its experts; DeepSpeed ZeRO-3 must treat it as one leaf module.
MOE_BLOCK_CLASSES = frozenset({
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
})


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class RouterInfo:
    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    layer: int
    num_experts: int
    top_k: int
    module: nn.Module = field(repr=False, compare=False)


def _param_shape(param: torch.Tensor) -> tuple[int, ...]:
    # Under ZeRO-3 a partitioned parameter is empty; DeepSpeed keeps its real shape in ds_shape.
    return tuple(getattr(param, "ds_shape", param.shape))


def _is_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if type(module).__name__ in ROUTER_CLASSES:
        return True
    # Other MoE families: a child named exactly "gate" beside a child named exactly "experts". Exact names,
    # never substrings: "shared_expert_gate" and "experts.gate_up_proj" are not routers.
    weight = getattr(module, "weight", None)
    return (
        name.rsplit(".", 1)[-1] == "gate"
        and parent is not None
        and isinstance(getattr(parent, "experts", None), nn.Module)
        and isinstance(weight, torch.Tensor)
        and len(_param_shape(weight)) == 2
    )


@ROUTERS.register("moe")
def find_moe_routers(model: nn.Module) -> list[RouterInfo]:
    """All token routers of an MoE causal LM, in layer order (empty for a dense model)."""
    modules = dict(model.named_modules())
    routers = []
    for name, module in modules.items():
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        if not _is_router(name, module, parent):
            continue
        match = _LAYER_RE.search(name)
        layer = int(match.group(1)) if match else len(routers)
        num_experts = getattr(module, "num_experts", None) or _param_shape(module.weight)[0]
        top_k = getattr(module, "top_k", None) or getattr(parent, "top_k", None) or 1
        routers.append(RouterInfo(name, layer, int(num_experts), int(top_k), module))
    routers.sort(key=lambda r: r.layer)
    return routers


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse MoE blocks in ``model`` (the parents of its routers)."""
    modules = dict(model.named_modules())
    classes = []
    for router in find_moe_routers(model):
        parent = modules[router.name.rsplit(".", 1)[0]]
        if type(parent) not in classes:
            classes.append(type(parent))
    return classes


class RouterCapture:
    """Collects router logits of one forward pass through forward hooks.

    Hooks are only active inside ``with capture:``, so the extra forward of gradient checkpointing during
    backward does not append duplicates. Each entry is ``(batch * seq, num_experts)``, padding included.

    ``detach=True`` cuts every router out of the network's graph: its input is detached and the routing
    weights it hands to the experts are detached, so gradients reach a router only through its own logits
    and nothing downstream is recorded for backward (no activations kept, no backward through the model).
    """

    def __init__(self, routers: list[RouterInfo], detach: bool = False):
        self.routers = routers
        self.detach = detach
        self.logits: list[torch.Tensor] = []
        self._handles: list = []

    def _pre_hook(self, module, args):
        return tuple(a.detach() if torch.is_tensor(a) else a for a in args)

    def _hook(self, module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        self.logits.append(logits)
        if self.detach and isinstance(output, tuple):
            return (logits,) + tuple(o.detach() if torch.is_tensor(o) else o for o in output[1:])
        return None

    def __enter__(self) -> "RouterCapture":
        self.logits = []
        self._handles = [r.module.register_forward_hook(self._hook) for r in self.routers]
        if self.detach:
            self._handles += [r.module.register_forward_pre_hook(self._pre_hook) for r in self.routers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if exc[0] is None and len(self.logits) != len(self.routers):
            raise RuntimeError(
                f"expected router logits from {len(self.routers)} layers, got {len(self.logits)}; "
                "is a router skipped in this forward pass?"
            )
        return False


def keep_routers_fp32(routers: list[RouterInfo]) -> None:
    """Hold router weights in fp32 inside a lower-precision model; their inputs are upcast on the way in.

    A no-op for an fp32 model. The routing softmax is already fp32 in every supported family, so only
    the weights and the logits' matmul change precision.
    """
    for router in routers:
        if router.module.weight.dtype == torch.float32:
            continue
        router.module.float()
        router.module.register_forward_pre_hook(
            lambda mod, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        )


def check_uniform_routers(routers: list[RouterInfo]) -> None:
    sizes = {(r.num_experts, r.top_k) for r in routers}
    if len(sizes) != 1:
        raise UserError(f"Routers with different expert counts / top-k are not supported: {sorted(sizes)}.")
    if routers[0].num_experts < 2:
        raise UserError("An MoE router needs at least 2 experts.")

