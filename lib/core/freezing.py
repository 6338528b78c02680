"""Choose what trains: everything is frozen except parameters selected by module class or exact name.

Never by loose substring: ``"gate"`` would also match ``experts.gate_up_proj`` and ``shared_expert_gate``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lib.core.errors import UserError, launched_rank


def _numel(param) -> int:
    # Partitioned ZeRO-3 parameters are empty locally; ds_numel is their real size.
    return int(getattr(param, "ds_numel", param.numel()))


def freeze_all_but(
    model: nn.Module,
    *,
    module_classes: Iterable[type | str] = (),
    module_names: Iterable[str] = (),
    param_suffixes: Iterable[str] = (),
    verbose: bool = True,
) -> list[str]:
    """Freeze every parameter except those of the selected modules; return the trainable names.

    ``module_classes``: classes (or class names) whose parameters train. ``module_names``: exact module paths
    from ``named_modules()``. ``param_suffixes``: exact dotted suffixes of parameter names (``"lm_head.weight"``
    matches ``lm_head.weight`` and ``model.lm_head.weight``, never ``my_lm_head.weight``).
    """
    classes = {c if isinstance(c, str) else c.__name__ for c in module_classes}
    names = set(module_names)
    suffixes = tuple(param_suffixes)
    selected: set[str] = set()
    found_modules = set()
    for mod_name, module in model.named_modules():
        if type(module).__name__ in classes or mod_name in names:
            found_modules.add(mod_name)
            for p_name, _ in module.named_parameters(recurse=True):
                selected.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    missing = names - found_modules
    if missing:
        raise UserError(f"No module named {sorted(missing)} in {type(model).__name__}; check the module names.")
    trainable, n_train, n_total = [], 0, 0
    for name, param in model.named_parameters():
        keep = name in selected or any(name == s or name.endswith("." + s) for s in suffixes)
        param.requires_grad_(keep)
        n_total += _numel(param)
        if keep:
            trainable.append(name)
            n_train += _numel(param)
    if not trainable:
        raise UserError("The selection matches no parameter, so nothing would train.")
    if verbose and launched_rank() == 0:
        print(f"trainable parameters: {n_train:,} / {n_total:,} ({100.0 * n_train / max(1, n_total):.4f}%) in "
              f"{len(trainable)} tensors", flush=True)
    return trainable


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (ZeRO-3 aware)."""
    total = trainable = 0
    for p in model.parameters():
        total += _numel(p)
        trainable += _numel(p) if p.requires_grad else 0
    return trainable, total
