"""Loading a model and its tokenizer from a builtin name, a hub id or a local path, upcycling it when asked.

Weights load from safetensors only, and remote code runs only with ``--trust_remote_code``. A name that cannot be
loaded (no such folder, unknown or gated hub repo, no network) is one sentence, not a traceback.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
)

from lib.core.cache import folder_weights_fingerprint
from lib.core.errors import UserError
from lib.core.hub import hub_error_sentence, hub_reachable
from lib.core.registry import resolve_attn_implementation
from lib.models.builtin import is_builtin, resolve_model_path
from lib.models.deepspeed import init_deepspeed_comm_for_zero3, zero3_init_disabled
from lib.models.upcycling import upcycle_to_moe

logger = logging.getLogger(__name__)


def cache_only(path: str) -> bool:
    """Without a reachable hub, ask transformers for its local cache only: a missing model is then an answer in a
    second instead of after minutes of connection retries, and a cached one still loads."""
    return not os.path.exists(path) and not hub_reachable()


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                flag: str = "--model_name_or_path"):
    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                          local_files_only=cache_only(path))
    except (OSError, ValueError) as err:
        if is_builtin(name_or_path):
            raise
        raise hub_error_sentence("model", name_or_path, err, flag) from err


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   flag: str = "--model_name_or_path"):
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                                  local_files_only=cache_only(path))
    except (OSError, ValueError) as err:
        if is_builtin(name_or_path):
            raise
        raise hub_error_sentence("model", name_or_path, err, flag) from err
    if tokenizer.pad_token is None:
        # Padding is always masked out of every loss and score, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    flag: str = "--model_name_or_path",
):
    """Load a causal LM from a builtin name, hub id or local path (safetensors only).

    The attention implementation is checked against this machine and the model class before loading; an
    unavailable one falls back (flash_attention_2 -> sdpa -> eager) with a warning.
    """
    config = load_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code, flag=flag)
    path = resolve_model_path(name_or_path)
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote-code models bring their own class
        model_class = None
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype == "auto":
        # Frozen-backbone training on CPU wants fp32; on GPU the checkpoint's own dtype is the sane default.
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                                  use_safetensors=_require_safetensors(path), local_files_only=cache_only(path))
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    attn = resolve_attn_implementation(attn_implementation, model_class)
    try:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kwargs)
    except OSError as err:
        if is_builtin(name_or_path):
            raise
        raise hub_error_sentence("model", name_or_path, err, flag) from err


def _require_safetensors(path: str) -> bool:
    """Safe loading: always ask for safetensors; a local folder with only pickle weights gets told how to convert."""
    if os.path.isdir(path):
        files = os.listdir(path)
        if any(f.endswith(".safetensors") for f in files):
            return True
        if any(f.endswith(".bin") for f in files):
            raise UserError(
                f"{path} only has pickle (.bin) weights; convert them to safetensors "
                "(model.save_pretrained(dir, safe_serialization=True)) so they load without executing code."
            )
    return True


def load_model_and_tokenizer(model_args, training_args=None) -> tuple[Any, Any]:
    """Load what ``ModelArguments`` describe, upcycling a dense model when asked.

    Under a ZeRO-3 config (``training_args.deepspeed``) the weights are partitioned while loading, except for a
    model to upcycle, which needs the full dense weights to copy into every expert.
    """
    trust = getattr(model_args, "trust_remote_code", False)
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision,
                               trust_remote_code=trust)
    load_kwargs = dict(
        dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        experts_implementation=model_args.experts_implementation, revision=model_args.model_revision,
        trust_remote_code=trust,
    )
    if model_args.upcycle_experts:
        with zero3_init_disabled(training_args):
            dense = load_model(model_args.model_name_or_path, **load_kwargs)
            model = upcycle_to_moe(
                dense, model_args.upcycle_experts, model_args.upcycle_top_k, model_args.upcycle_noise,
                seed=model_args.upcycle_seed,
            )
        if model_args.experts_implementation:
            model.set_experts_implementation(model_args.experts_implementation)
        del dense
    else:
        init_deepspeed_comm_for_zero3()
        model = load_model(model_args.model_name_or_path, **load_kwargs)
    return model, tokenizer


def weights_fingerprint(name_or_path: str, revision: str | None = None) -> str | None:
    """Content fingerprint of a model's weights: a local or builtin folder, or a hub snapshot already in the local
    cache; None when the weights are not on this machine."""
    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path):
        try:
            path = snapshot_download(path, revision=revision, local_files_only=True,
                                     allow_patterns=["*.json", "*.safetensors"])
        except Exception:  # noqa: BLE001 - not downloaded (or not a hub id): nothing local to fingerprint
            return None
    try:
        return folder_weights_fingerprint(path)
    except FileNotFoundError:
        return None
