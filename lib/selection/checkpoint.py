"""Rebuilding the model select_data.py scores with: the base model, upcycled as in training, plus the trained routers.

A router checkpoint holds only what trained (``trainable.safetensors``) and ``router_config.json``, which names the
base model (and its revision and weights fingerprint) and the upcycling settings. A folder that also holds a full
transformers checkpoint (``--save_full_model``, or a checkpoint from before format 2) loads as it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from lib.core.cache import file_digest
from lib.core.errors import UserError
from lib.core.trainer import TRAINABLE_WEIGHTS_NAME
from lib.models.loading import load_model, load_tokenizer, weights_fingerprint
from lib.models.moe import RouterInfo, find_moe_routers, keep_routers_fp32
from lib.models.upcycling import upcycle_to_moe
from lib.selection.split import (
    ExpertSplit,
    checkpoint_file,
    find_router_config,
    load_router_config,
)


@dataclass
class ScoringModel:
    model: Any
    tokenizer: Any
    routers: list[RouterInfo]
    split: ExpertSplit | None
    router_config: dict
    fingerprint: str  # content of every weight the scores depend on


def _has_full_weights(checkpoint: str, revision: str | None) -> bool:
    return any(checkpoint_file(checkpoint, name, revision) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))


def load_scoring_model(name: str, *, want_router: bool, dtype: str, attn_implementation: str | None,
                       experts_implementation: str | None, revision: str | None, trust_remote_code: bool,
                       device: torch.device) -> ScoringModel:
    """The model ``--router_model`` names, ready to score on ``device``.

    With ``want_router`` it is a train_router.py checkpoint (a folder or hub repo with router_config.json);
    otherwise any causal LM (perplexity, IFD).
    """
    load = dict(dtype=dtype, attn_implementation=attn_implementation, experts_implementation=experts_implementation,
                trust_remote_code=trust_remote_code, flag="--router_model")
    if not want_router:
        model = load_model(name, revision=revision, **load)
        tokenizer = load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code, flag="--router_model")
        fingerprint = weights_fingerprint(name, revision) or f"hub:{name}@{revision}"
        return ScoringModel(model.to(device).eval(), tokenizer, [], None, {}, fingerprint)

    cfg = load_router_config(name, revision)
    if _has_full_weights(name, revision):
        model = load_model(name, revision=revision, **load)
        tokenizer = load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code, flag="--router_model")
        fingerprint = weights_fingerprint(name, revision) or f"hub:{name}@{revision}"
    else:
        model, tokenizer, fingerprint = _rebuild(name, cfg, revision, load)
    routers = find_moe_routers(model)
    split = ExpertSplit.from_dict(cfg)
    if [r.layer for r in routers] != split.layers:
        raise UserError(
            f"{name}: router_config.json lists router layers {split.layers} but the model has routers in layers "
            f"{[r.layer for r in routers]}; point to the checkpoint folder it was saved with."
        )
    keep_routers_fp32(routers)  # scores are computed in fp32 whatever the model's dtype
    return ScoringModel(model.to(device).eval(), tokenizer, routers, split, cfg, fingerprint)


def load_row_tokenizer(name: str | None, *, revision: str | None, trust_remote_code: bool) -> ScoringModel:
    """No model, for scores that read only the rendered rows (fasttext): the tokenizer of ``name`` when chat rows
    need its chat template (a router checkpoint without one uses its base model's), else nothing at all."""
    if name is None:
        return ScoringModel(None, None, [], None, {}, "none")
    source, source_revision = name, revision
    if find_router_config(name, revision) and not checkpoint_file(name, "tokenizer_config.json", revision):
        cfg = load_router_config(name, revision)
        source, source_revision = cfg.get("base_model") or name, cfg.get("base_model_revision")
    tokenizer = load_tokenizer(source, revision=source_revision, trust_remote_code=trust_remote_code,
                               flag="--router_model")
    template = getattr(tokenizer, "chat_template", None) or ""
    fingerprint = "chat_template:" + hashlib.sha256(str(template).encode()).hexdigest()
    return ScoringModel(None, tokenizer, [], None, {}, fingerprint)


def _rebuild(name: str, cfg: dict, revision: str | None, load: dict) -> tuple[Any, Any, str]:
    """Base model + upcycling + trained routers, as recorded in router_config.json."""
    base = cfg.get("base_model")
    trained = checkpoint_file(name, TRAINABLE_WEIGHTS_NAME, revision)
    if not base or trained is None:
        raise UserError(f"{name} holds neither a full model nor {TRAINABLE_WEIGHTS_NAME} with a base_model in its "
                        "router_config.json; point to a checkpoint written by train_router.py.")
    base_revision = cfg.get("base_model_revision")
    recorded = cfg.get("base_model_fingerprint")
    current = weights_fingerprint(base, base_revision)
    if recorded and current and recorded != current:
        raise UserError(f"The base model {base} has changed since the routers in {name} were trained on it (its "
                        "weights differ); score with the base model they were trained on, or retrain the routers.")
    load = {**load, "flag": f"base_model of {name}"}
    model = load_model(base, revision=base_revision, **load)
    upcycle = cfg.get("upcycle")
    if upcycle:
        model = upcycle_to_moe(model, upcycle["num_experts"], upcycle["top_k"], upcycle.get("noise", 0.0),
                               seed=upcycle.get("seed", 0))
        if load.get("experts_implementation"):
            model.set_experts_implementation(load["experts_implementation"])
    params = dict(model.named_parameters())
    tensors = load_file(trained)
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise UserError(f"{trained} holds weights this model does not have ({unknown[:3]}); the base model or the "
                        "upcycling settings in router_config.json do not match it.")
    with torch.no_grad():
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(params[key].shape):
                raise UserError(f"{trained}: {key} has shape {tuple(value.shape)}, the model's is "
                                f"{tuple(params[key].shape)}; the checkpoint and its base model do not match.")
            params[key].copy_(value.to(params[key].dtype))
    tokenizer_src = name if checkpoint_file(name, "tokenizer_config.json", revision) else base
    tokenizer = load_tokenizer(tokenizer_src, revision=revision if tokenizer_src == name else base_revision,
                               trust_remote_code=load["trust_remote_code"], flag="--router_model")
    fingerprint = f"base={current or f'{base}@{base_revision}'};upcycle={upcycle};trained={file_digest(trained)}"
    return model, tokenizer, fingerprint
