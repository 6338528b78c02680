"""PEFT adapters: check, merge into a base model, save the merged model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel

from lib.core.errors import UserError
from lib.core.files import replace_dir
from lib.models.deepspeed import zero3_init_disabled
from lib.models.loading import load_model_and_tokenizer


def peft_target_modules(targets: str) -> str | list[str]:
    """``--lora_target_modules`` as PEFT's ``LoraConfig(target_modules=...)`` takes it: ``all-linear`` as it is,
    else the comma-separated module names."""
    targets = targets.strip()
    return targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]


def check_adapter_dir(adapter_dir: str) -> None:
    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise UserError(f"--adapter {adapter_dir} has no adapter_config.json; point it to the output_dir of "
                        "train_target.py --use_peft.")


def merge_adapter_into(model, adapter_dir: str):
    """``model`` with the PEFT adapter in ``adapter_dir`` merged into its weights (they change in place)."""
    check_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def load_with_adapter(model_args, adapter_dir: str | None, training_args=None):
    """The base model ``model_args`` describe, with a PEFT adapter merged in when one is given (full weights, even
    inside a ZeRO-3 run: pass its ``training_args``)."""
    with zero3_init_disabled(training_args):
        model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    return (merge_adapter_into(model, adapter_dir) if adapter_dir else model), tokenizer


def merge_adapter(model_args, adapter_dir: str, out_dir: str, training_args=None) -> str:
    """Save the base model with the adapter merged in as an ordinary transformers checkpoint (atomically)."""
    model, tokenizer = load_with_adapter(model_args, adapter_dir, training_args)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(str(tmp), out_dir)  # an earlier merged model stays in place until the new one is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.abspath(out_dir)

