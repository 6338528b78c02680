"""Arguments of train_target.py: the rows, the LoRA adapter, and TRL's SFTConfig made to work on CPU-only machines."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from trl import SFTConfig

from lib.core.errors import UserError
from lib.core.training_args import RunArguments, adapt_to_cpu_only_machines


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
    # Plain-text rows use TRL's own --dataset_text_field (default "text"): loss on every token.
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

    def peft_config(self) -> LoraConfig:
        from lib.models.adapters import peft_target_modules

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=peft_target_modules(self.lora_target_modules), task_type="CAUSAL_LM",
                          bias="none")


@dataclass
class TargetTrainingArguments(RunArguments, SFTConfig):
    """TRL's SFTConfig, working on CPU-only machines under torchrun and DeepSpeed too."""

    def __post_init__(self):
        if self.bf16 is None and not torch.cuda.is_available():
            # TRL turns bf16 on unless told otherwise; on a CPU that means slow emulated mixed precision.
            self.bf16 = False
        adapt_to_cpu_only_machines(self)
        super().__post_init__()

