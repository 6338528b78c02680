"""What the benchmarks share: whether a model needs upcycling before it has routers to measure."""

from __future__ import annotations

DEFAULT_UPCYCLE_EXPERTS = 8


def has_routers(model_name: str) -> bool:
    """Whether ``model_name`` is already an MoE model, decided from its config alone (the model is built on the
    meta device, so no weights are loaded or allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lib.models.loading import load_config
    from lib.models.moe import find_moe_routers

    config = load_config(model_name, flag="--model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return bool(find_moe_routers(model))


def upcycle_experts_for(model_name: str, requested: int | None) -> int:
    """Experts to upcycle ``model_name`` to: 0 for an MoE model, ``requested`` (default 8) for a dense one.

    The default only applies to a dense model, so ``--model builtin:tiny-mixtral`` measures Mixtral's own routers;
    asking explicitly to upcycle a model that already has routers is a mistake worth one sentence.
    """
    from lib.core.errors import UserError

    if has_routers(model_name):
        if requested:
            raise UserError(f"{model_name} is already an MoE model, so it cannot be upcycled; drop "
                            f"--upcycle_experts {requested} to measure its own routers.")
        return 0
    n = DEFAULT_UPCYCLE_EXPERTS if requested is None else requested
    if n < 2:
        raise UserError(f"{model_name} is a dense model without routers; pass --upcycle_experts N (N >= 2, default "
                        f"{DEFAULT_UPCYCLE_EXPERTS}) to upcycle it to an MoE model.")
    return n
