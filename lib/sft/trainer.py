"""Stage 3: supervised fine-tuning of the target model on the selected rows, with TRL's SFTTrainer and PEFT LoRA."""

from __future__ import annotations

import os

from trl import SFTTrainer

from lib.core.cards import write_model_card
from lib.selection.outputs import read_summary


def selection_provenance(train_file: str) -> dict | None:
    """What select_data.py recorded about the rows in ``train_file`` (the summary.json beside it), if it came from
    select_data.py; a file from an unfinished select_data.py run is refused."""
    folder = os.path.dirname(os.path.abspath(train_file))
    if not os.path.isfile(train_file):
        return None
    summary = read_summary(folder)
    if summary is None:
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
        "summary": os.path.join(folder, "summary.json"),
    }


class TargetTrainer(SFTTrainer):
    """SFTTrainer whose model card also records where the training rows came from."""

    def __init__(self, *args, base_model: str = "", train_file: str = "", lora: dict | None = None,
                 provenance: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.card_info = {"base_model": base_model, "train_file": train_file, "lora": lora,
                          "provenance": provenance}

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        if not self.is_world_process_zero():
            return
        info, args = self.card_info, self.args
        lines = [
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
        write_model_card(args.output_dir, title=model_name or os.path.basename(os.path.abspath(args.output_dir)),
                         lines=lines, library_name="peft" if info["lora"] else "transformers",
                         tags=["sidekit", "sft", "trl"], base_model=info["base_model"])
