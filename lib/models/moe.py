"""MoE routers: finding them, capturing their logits, and splitting experts into quality and garbage bins."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lib.errors import UserError
from lib.registry import ROUTERS

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
    import deepspeed
    from deepspeed.utils import z3_leaf_module

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


# --------------------------------------------------------------------------------------------------
# Expert split
# --------------------------------------------------------------------------------------------------

ROUTER_CONFIG_NAME = "router_config.json"
ROUTER_CONFIG_VERSION = 1


def num_garbage_experts(num_experts: int, ratio: float) -> int:
    """How many experts form the garbage bin: round(ratio * E), at least 1 and at most E - 1."""
    if not 0 < ratio < 1:
        raise UserError(f"--garbage_expert_ratio must be strictly between 0 and 1, got {ratio}.")
    return min(num_experts - 1, max(1, round(ratio * num_experts)))


@dataclass
class ExpertSplit:
    """Which experts of each router layer are garbage bins; the rest are quality experts."""

    num_experts: int
    top_k: int
    garbage_experts: dict[int, list[int]]  # layer index -> sorted expert ids
    method: str = "index"

    @property
    def layers(self) -> list[int]:
        return sorted(self.garbage_experts)

    def masks(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """One boolean ``(num_experts,)`` mask per router layer, True for garbage experts."""
        out = []
        for layer in self.layers:
            mask = torch.zeros(self.num_experts, dtype=torch.bool, device=device)
            mask[self.garbage_experts[layer]] = True
            out.append(mask)
        return out

    @classmethod
    def by_index(cls, routers: list[RouterInfo], ratio: float) -> "ExpertSplit":
        """The last ``round(ratio * E)`` experts of every layer are the garbage bin."""
        e = routers[0].num_experts
        n = num_garbage_experts(e, ratio)
        return cls(e, routers[0].top_k, {r.layer: list(range(e - n, e)) for r in routers}, "index")

    @classmethod
    def by_probe(cls, routers: list[RouterInfo], ratio: float, garbage_share: torch.Tensor,
                 good_share: torch.Tensor | None) -> "ExpertSplit":
        """Per layer, the experts that garbage tokens are routed to most (ESFT-style affinity).

        ``garbage_share`` / ``good_share``: ``(layers, E)`` share of top-k slots each expert receives from
        garbage / good probe tokens. Ranking by the difference picks experts that garbage prefers *more than*
        good text does; ties go to the lower expert id so the split is deterministic.
        """
        e = routers[0].num_experts
        n = num_garbage_experts(e, ratio)
        affinity = garbage_share - (good_share if good_share is not None else 0)
        split = {}
        for i, router in enumerate(routers):
            order = sorted(range(e), key=lambda j: (-float(affinity[i, j]), j))
            split[router.layer] = sorted(order[:n])
        return cls(e, routers[0].top_k, split, "probe")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["garbage_experts"] = {str(k): v for k, v in self.garbage_experts.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertSplit":
        return cls(d["num_experts"], d["top_k"], {int(k): list(v) for k, v in d["garbage_experts"].items()},
                   d.get("method", "index"))


def check_uniform_routers(routers: list[RouterInfo]) -> None:
    sizes = {(r.num_experts, r.top_k) for r in routers}
    if len(sizes) != 1:
        raise UserError(f"Routers with different expert counts / top-k are not supported: {sorted(sizes)}.")
    if routers[0].num_experts < 2:
        raise UserError("An MoE router needs at least 2 experts.")


def save_router_config(output_dir: str, split: ExpertSplit, routers: list[RouterInfo], extra: dict) -> str:
    """Write ``router_config.json`` (atomically) next to a checkpoint: what select_data.py needs to score."""
    payload = {
        "format_version": ROUTER_CONFIG_VERSION,
        "router_type": "moe",
        "router_modules": [r.name for r in routers],
        "router_layers": [r.layer for r in routers],
        **split.to_dict(),
        **extra,
    }
    from lib.files import write_json

    path = os.path.join(output_dir, ROUTER_CONFIG_NAME)
    write_json(path, payload)
    return path


def find_router_config(checkpoint: str, revision: str | None = None) -> str | None:
    """Local path of a checkpoint's ``router_config.json`` (a folder, or a hub repo it is downloaded from)."""
    if os.path.isdir(checkpoint):
        path = os.path.join(checkpoint, ROUTER_CONFIG_NAME)
        return path if os.path.exists(path) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(checkpoint, ROUTER_CONFIG_NAME, revision=revision)
    except Exception:  # noqa: BLE001 - not a hub repo, no such file, or offline: all mean "none found"
        return None


def load_router_config(checkpoint_dir: str, revision: str | None = None) -> dict:
    path = find_router_config(checkpoint_dir, revision)
    if path is None:
        raise UserError(
            f"{checkpoint_dir} has no {ROUTER_CONFIG_NAME}; point to a checkpoint written by train_router.py."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)
