"""The expert split (which experts of each layer form the garbage bin) and ``router_config.json``, the file that
tells select_data.py how a router checkpoint was trained and how to rebuild its model."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from lib.core.errors import UserError
from lib.core.files import write_json
from lib.core.hub import hub_error_sentence, hub_reachable, looks_like_a_path
from lib.models.builtin import resolve_model_path
from lib.models.moe import RouterInfo

ROUTER_CONFIG_NAME = "router_config.json"


# 2: checkpoints hold only the trained routers; the model is rebuilt from base_model (+ upcycle).
ROUTER_CONFIG_VERSION = 2


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


def save_router_config(output_dir: str, split: ExpertSplit, routers: list[RouterInfo], extra: dict) -> str:
    """Write ``router_config.json`` (atomically) next to a checkpoint: what select_data.py needs to rebuild the model
    and score with it."""
    payload = {
        "format_version": ROUTER_CONFIG_VERSION,
        "router_type": "moe",
        "router_modules": [r.name for r in routers],
        "router_layers": [r.layer for r in routers],
        **split.to_dict(),
        **extra,
    }
    path = os.path.join(output_dir, ROUTER_CONFIG_NAME)
    write_json(path, payload)
    return path


def checkpoint_file(checkpoint: str, filename: str, revision: str | None = None) -> str | None:
    """Local path of ``filename`` in a checkpoint folder or hub repo (downloaded); None when it has no such file.

    A hub repo that cannot be reached (unknown, private, gated, offline) is one sentence, not "no such file".
    """
    checkpoint = resolve_model_path(checkpoint)
    if os.path.isdir(checkpoint):
        path = os.path.join(checkpoint, filename)
        return path if os.path.exists(path) else None
    if looks_like_a_path(checkpoint):
        raise UserError(f"--router_model {checkpoint} does not exist; check the path.")
    try:
        return hf_hub_download(checkpoint, filename, revision=revision, local_files_only=not hub_reachable())
    except EntryNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - every other failure becomes the sentence that names it
        raise hub_error_sentence("router checkpoint", checkpoint, err, "--router_model") from err


def find_router_config(checkpoint: str, revision: str | None = None) -> str | None:
    """Local path of a checkpoint's ``router_config.json`` (a folder, or a hub repo it is downloaded from)."""
    return checkpoint_file(checkpoint, ROUTER_CONFIG_NAME, revision)


def load_router_config(checkpoint: str, revision: str | None = None) -> dict:
    path = find_router_config(checkpoint, revision)
    if path is None:
        raise UserError(f"{checkpoint} has no {ROUTER_CONFIG_NAME}; point to a checkpoint written by train_router.py.")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); restore it from the run that "
                        "wrote it, or retrain.") from None
    missing = [k for k in ("num_experts", "top_k", "garbage_experts") if k not in cfg] if isinstance(cfg, dict) else []
    if not isinstance(cfg, dict) or missing:
        raise UserError(f"{path} is not a router_config.json written by train_router.py (missing {missing or 'all'}); "
                        "restore it from the run that wrote it, or retrain.")
    return cfg
