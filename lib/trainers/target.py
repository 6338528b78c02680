"""Stage 3: supervised fine-tuning of the target model on the selected rows, with TRL's SFTTrainer and PEFT LoRA."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from lib.files import atomic_path
from lib.trainers.base import adapt_to_cpu_only_machines


@dataclass
class TargetTrainingArguments(SFTConfig):
    """TRL's SFTConfig, working on CPU-only machines under torchrun and DeepSpeed too."""

    def __post_init__(self):
        import torch

        if self.bf16 is None and not torch.cuda.is_available():
            # TRL turns bf16 on unless told otherwise; on a CPU that means slow emulated mixed precision.
            self.bf16 = False
        adapt_to_cpu_only_machines(self)
        super().__post_init__()


def selection_provenance(train_file: str) -> dict | None:
    """What select_data.py recorded about the rows in ``train_file`` (its summary.json beside the file), if any."""
    path = os.path.join(os.path.dirname(os.path.abspath(train_file)), "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    if "selection" not in summary or "counts" not in summary:
        return None
    return {
        "pool": summary.get("data", {}).get("source"),
        "pool_fingerprint": summary.get("data", {}).get("fingerprint"),
        "router_model": summary.get("model", {}).get("path"),
        "score": summary["selection"].get("score"),
        "select_ratio": summary["selection"].get("select_ratio"),
        "select_top_k": summary["selection"].get("select_top_k"),
        "score_threshold": summary["selection"].get("score_threshold"),
        "rows_in_pool": summary["counts"].get("rows"),
        "rows_selected": summary["counts"].get("selected"),
        "summary": path,
    }


class TargetTrainer(SFTTrainer):
    """SFTTrainer whose model card also records where the training rows came from."""

    def __init__(self, *args, base_model: str = "", train_file: str = "", lora: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.card_info = {"base_model": base_model, "train_file": train_file, "lora": lora,
                          "provenance": selection_provenance(train_file) if train_file else None}

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        if not self.is_world_process_zero():
            return
        info, args = self.card_info, self.args
        front = ["library_name: peft" if info["lora"] else "library_name: transformers", "tags: [sidekit, sft, trl]"]
        if "/" in info["base_model"] and not os.path.exists(info["base_model"]):
            front.append(f"base_model: {info['base_model']}")  # a hub id: links the card to its base model
        lines = [
            "---", *front, "---", "", f"# {model_name or os.path.basename(os.path.abspath(args.output_dir))}", "",
            f"Fine-tuned from `{info['base_model']}` with `train_target.py` (TRL SFTTrainer"
            + (f", LoRA r={info['lora']['r']} alpha={info['lora']['alpha']} on {info['lora']['target_modules']})."
               if info["lora"] else ", full fine-tuning)."),
            "", "## Training data", "", f"- file: `{info['train_file']}`",
        ]
        prov = info["provenance"]
        if prov:
            rule = (f"top {prov['select_ratio']:.0%} of the pool" if prov["select_ratio"] is not None else
                    f"top {prov['select_top_k']} rows" if prov["select_top_k"] is not None else
                    f"selection_score >= {prov['score_threshold']}")
            lines += [
                f"- selected by `select_data.py` from `{prov['pool']}` ({prov['rows_in_pool']} rows, "
                f"{prov['pool_fingerprint']}): {prov['rows_selected']} rows, {rule} by `{prov['score']}`",
                f"- scoring model: `{prov['router_model']}`", f"- selection summary: `{prov['summary']}`",
            ]
        lines += [
            "", "## Training", "",
            f"- epochs {args.num_train_epochs}, max steps {args.max_steps}, learning rate {args.learning_rate}, "
            f"batch {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation, "
            f"max length {args.max_length}, seed {args.seed}",
        ]
        evals = [h for h in self.state.log_history if "eval_loss" in h]
        if evals:
            lines.append(f"- final eval loss {evals[-1]['eval_loss']:.4f}")
        with atomic_path(os.path.join(args.output_dir, "README.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
