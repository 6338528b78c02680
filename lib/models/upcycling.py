"""Sparse upcycling: turn a dense Llama/Mistral (-> Mixtral) or Qwen3 (-> Qwen3-MoE) model into its MoE sibling whose
experts all start as copies of the dense MLP, so the MoE model first computes exactly what the dense one did."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from lib.core.errors import UserError

# dense model_type -> (MoE model_type, name of the expert-count field in the MoE config)
UPCYCLE_TARGETS = {
    "llama": ("mixtral", "num_local_experts"),
    "mistral": ("mixtral", "num_local_experts"),
    "qwen3": ("qwen3_moe", "num_experts"),
}


_SHARED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "attention_dropout",
)


def upcycle_config(dense_config, num_experts: int, top_k: int):
    """The config of the MoE sibling of a dense Llama/Mistral/Qwen3 config."""
    model_type = dense_config.model_type
    if model_type not in UPCYCLE_TARGETS:
        raise UserError(
            f"--upcycle_experts supports dense {', '.join(sorted(UPCYCLE_TARGETS))} models, not '{model_type}'; "
            "load an MoE checkpoint directly instead."
        )
    if not 1 <= top_k <= num_experts:
        raise UserError(f"--upcycle_top_k must be between 1 and --upcycle_experts ({num_experts}), got {top_k}.")
    if getattr(dense_config, "mlp_bias", False):
        raise UserError("Upcycling a model whose MLP has biases is not supported: the MoE experts have none.")
    moe_type, experts_field = UPCYCLE_TARGETS[model_type]
    kwargs = {k: getattr(dense_config, k) for k in _SHARED_CONFIG_FIELDS if hasattr(dense_config, k)}
    kwargs[experts_field] = num_experts
    kwargs["num_experts_per_tok"] = top_k
    kwargs["output_router_logits"] = False
    if moe_type == "mixtral":
        if getattr(dense_config, "attention_bias", False):
            raise UserError("Upcycling a Llama model with attention biases is not supported: Mixtral has none.")
        kwargs["sliding_window"] = getattr(dense_config, "sliding_window", None)
        kwargs["router_jitter_noise"] = 0.0
    else:
        kwargs.update(
            moe_intermediate_size=dense_config.intermediate_size,
            # Normalised top-k weights make identical experts reproduce the dense MLP exactly.
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=getattr(dense_config, "attention_bias", False),
            use_sliding_window=getattr(dense_config, "use_sliding_window", False),
            sliding_window=getattr(dense_config, "sliding_window", None),
            max_window_layers=getattr(dense_config, "max_window_layers", dense_config.num_hidden_layers),
            layer_types=getattr(dense_config, "layer_types", None),
        )
    config = AutoConfig.for_model(moe_type, **kwargs)
    config.upcycled_from = {
        "model_type": model_type,
        "name_or_path": getattr(dense_config, "_name_or_path", ""),
        "num_experts": num_experts,
        "top_k": top_k,
    }
    return config


@torch.no_grad()
def upcycle_to_moe(dense_model, num_experts: int, top_k: int, noise: float = 0.0, seed: int = 0):
    """Turn a dense model into its MoE sibling whose experts start as copies of the dense MLP.

    ``noise`` adds seeded Gaussian noise of ``noise * std(weight)`` to every expert copy so experts can
    diverge; routers start from ``N(0, initializer_range)``. With ``noise=0`` the MoE model computes exactly
    what the dense one does (top-k weights are renormalised to sum to one).
    """
    config = upcycle_config(dense_model.config, num_experts, top_k)
    attn = getattr(dense_model.config, "_attn_implementation", None)
    if attn:
        config._attn_implementation = attn
    dtype = next(dense_model.parameters()).dtype
    with no_init_weights():
        moe = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    dense_sd = dense_model.state_dict()
    moe_sd = moe.state_dict()
    new_sd: dict[str, torch.Tensor] = {}
    for key, value in dense_sd.items():
        if ".mlp." not in key:
            new_sd[key] = value
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        gate = dense_sd[prefix + "gate_proj.weight"]
        up = dense_sd[prefix + "up_proj.weight"]
        down = dense_sd[prefix + "down_proj.weight"]
        gate_up = torch.cat([gate, up], dim=0)
        new_sd[prefix + "experts.gate_up_proj"] = _expert_copies(gate_up, num_experts, noise, generator)
        new_sd[prefix + "experts.down_proj"] = _expert_copies(down, num_experts, noise, generator)
        router = moe_sd[prefix + "gate.weight"]
        new_sd[prefix + "gate.weight"] = (
            torch.randn(router.shape, generator=generator) * config.initializer_range
        ).to(router.dtype)
    missing, unexpected = moe.load_state_dict(new_sd, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycling produced mismatched weights: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = dense_model.generation_config
    moe.config._name_or_path = f"{getattr(dense_model.config, '_name_or_path', 'dense')}-upcycled-{num_experts}x"
    return moe


def _expert_copies(weight: torch.Tensor, n: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    copies = weight.unsqueeze(0).repeat(n, *([1] * weight.dim()))
    if noise > 0:
        std = weight.float().std()
        copies += (torch.randn(copies.shape, generator=generator) * noise * std).to(copies.dtype)
    return copies

