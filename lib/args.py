"""Argument dataclasses shared by the scripts, and recipe files (YAML/JSON) with CLI overrides.

Every script accepts ``script.py [recipe.yaml] [--field value ...]``: values in the recipe become the
defaults and flags on the command line override them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields

from lib.errors import UserError

CHOICES_DTYPE = ["auto", "float32", "bfloat16", "float16"]
CHOICES_ATTN = ["flash_attention_2", "sdpa", "eager"]
CHOICES_EXPERTS = ["eager", "grouped_mm", "batched_mm"]


@dataclass
class ModelLoadArguments:
    """How to load the model; scripts whose training arguments already carry trust_remote_code (TRL) use this."""

    model_name_or_path: str = field(
        metadata={"help": "Hub id, local path, or builtin name (builtin:smollm2-135m-instruct, builtin:tiny-<arch>)."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.", "choices": CHOICES_DTYPE},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel; unavailable ones fall back (flash_attention_2 -> sdpa -> eager).",
                  "choices": CHOICES_ATTN},
    )
    experts_implementation: str | None = field(
        default=None,
        metadata={"help": "MoE experts kernel (transformers' choice when unset).", "choices": CHOICES_EXPERTS},
    )
    upcycle_experts: int = field(
        default=0, metadata={"help": "Turn a dense Llama/Mistral/Qwen3 model into an MoE with this many experts (0: off)."}
    )
    upcycle_top_k: int = field(default=2, metadata={"help": "Experts routed per token in the upcycled model."})
    upcycle_noise: float = field(
        default=0.0, metadata={"help": "Relative std of seeded noise added to each expert copy (0: exact copies)."}
    )
    upcycle_seed: int = field(default=0, metadata={"help": "Seed of the fresh routers and expert noise."})

    def __post_init__(self):
        if self.upcycle_experts < 0 or self.upcycle_experts == 1:
            raise UserError(f"--upcycle_experts must be 0 (off) or at least 2, got {self.upcycle_experts}.")
        if self.upcycle_experts and not 1 <= self.upcycle_top_k <= self.upcycle_experts:
            raise UserError(
                f"--upcycle_top_k must be between 1 and --upcycle_experts ({self.upcycle_experts}), got {self.upcycle_top_k}."
            )
        if self.upcycle_noise < 0:
            raise UserError(f"--upcycle_noise must be >= 0, got {self.upcycle_noise}.")


@dataclass
class ModelArguments(ModelLoadArguments):
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub. Off by default for safety."}
    )


@dataclass
class DataArguments:
    train_file: str = field(
        metadata={"help": "Training rows: a .jsonl/.json/.parquet/.csv file or a `datasets` hub name."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Held-out rows in the same format (enables eval_router/auroc)."}
    )
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "Hold out this percentage of the training rows when no validation_file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    text_field: str = field(default="text", metadata={"help": "Column holding plain text."})
    messages_field: str | None = field(
        default=None, metadata={"help": "Column holding chat messages (rendered with the chat template); overrides text_field."}
    )
    label_field: str | None = field(
        default=None, metadata={"help": "Column with 1 (good) / 0 (garbage); rows without it are taken as good."}
    )
    max_seq_length: int = field(default=512, metadata={"help": "Longer rows are truncated."})
    synthetic_negatives: bool = field(
        default=False, metadata={"help": "Make garbage rows from the good ones (seeded corruptions)."}
    )
    synthetic_ratio: float = field(default=1.0, metadata={"help": "Synthetic garbage rows per good row."})
    synthetic_kinds: str = field(
        default="shuffle,noise,truncate,repeat,mismatch",
        metadata={"help": "Comma-separated corruptions used for synthetic negatives."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}.")
        if self.synthetic_ratio <= 0:
            raise UserError(f"--synthetic_ratio must be > 0, got {self.synthetic_ratio}.")
        if self.max_seq_length < 8:
            raise UserError(f"--max_seq_length must be at least 8, got {self.max_seq_length}.")
        from lib.data import CORRUPTIONS

        unknown = [k for k in self.kinds() if k not in CORRUPTIONS]
        if unknown or not self.kinds():
            raise UserError(
                f"--synthetic_kinds has unknown corruption(s) {unknown}; choose from {', '.join(CORRUPTIONS)}."
            )

    def kinds(self) -> list[str]:
        return [k.strip() for k in self.synthetic_kinds.split(",") if k.strip()]


def _read_recipe(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            data = json.load(f)
        else:
            import yaml

            data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Recipe {path} must be a mapping of argument names to values, got {type(data).__name__}.")
    return data


def resume_argument(value: str | bool | None) -> str | bool | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true`` for the newest one in output_dir."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true" or None
    return value or None


def parse_args(dataclass_types: tuple, argv: list[str] | None = None):
    """Parse ``[recipe.yaml|json] [--flag value ...]`` into the given dataclasses.

    Recipe values become parser defaults, so anything on the command line wins. Unknown recipe keys are
    refused with the recipe's path.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    recipe: dict = {}
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        path = argv.pop(0)
        if not os.path.exists(path):
            raise UserError(f"Recipe {path} does not exist; pass an existing YAML/JSON file or only flags.")
        recipe = _read_recipe(path)
        known = {f.name for dc in dataclass_types for f in fields(dc) if f.init}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise UserError(f"Recipe {path} has unknown setting(s) {unknown}; check the spelling against --help.")
        # Settings given by the recipe are no longer required on the command line.
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
        parser.set_defaults(**recipe)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


@dataclass
class SFTDataArguments:
    train_file: str = field(
        metadata={"help": "Training rows (e.g. select_data.py's selected.jsonl): .jsonl/.json/.parquet/.csv or a "
                          "`datasets` hub name."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Held-out rows in the same format."})
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "Hold out this percentage of the training rows when no validation_file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    text_field: str = field(default="text", metadata={"help": "Column of plain-text rows (loss on every token)."})
    messages_field: str | None = field(
        default=None, metadata={"help": "Column of chat rows, rendered with the chat template; loss on assistant turns."}
    )
    prompt_field: str | None = field(
        default=None, metadata={"help": "Column of prompts for prompt/completion rows (loss on the completion)."}
    )
    completion_field: str = field(default="completion", metadata={"help": "Column of completions (with --prompt_field)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}.")
        if self.messages_field and self.prompt_field:
            raise UserError("Pass --messages_field (chat rows) or --prompt_field (prompt/completion rows), not both.")


@dataclass
class LoraArguments:
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Modules that get adapters: all-linear, or comma-separated module names (q_proj,v_proj)."},
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "Also save the base model with the adapter merged in, under output_dir/merged."}
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise UserError(f"--lora_r must be at least 1, got {self.lora_r}.")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.merge_adapter and not self.use_peft:
            raise UserError("--merge_adapter needs --use_peft (a full fine-tune has no adapter to merge).")

    def peft_config(self):
        from peft import LoraConfig

        targets = self.lora_target_modules.strip()
        modules = targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=modules, task_type="CAUSAL_LM", bias="none")


@dataclass
class EncoderDataArguments:
    tools_file: str = field(metadata={"help": "JSON list of {name, description, resources: {...numbers}}."})
    train_file: str = field(metadata={"help": "Rows of {query, tool, kind?}; kind 'resource' marks queries that only "
                                              "resource facts settle."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out queries, same format."})
