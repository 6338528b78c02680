"""Arguments of evaluate.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.core.errors import UserError


@dataclass
class EvaluateArguments:
    output_dir: str = field(metadata={"help": "Where results.json and results.md go."})
    adapter: str | None = field(
        default=None, metadata={"help": "A LoRA adapter (train_target.py --use_peft output_dir); the tuned run "
                                        "is the base model with it merged in."}
    )
    tasks: str = field(default="", metadata={"help": "Comma-separated lm-eval task or group names (arc_easy,piqa)."})
    task_file: str | None = field(
        default=None, metadata={"help": "Also evaluate a jsonl of {question, choices, answer} rows."}
    )
    limit: float | None = field(
        default=None, metadata={"help": "Examples per task (an integer), or a fraction of each task when below 1."}
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples (the task's default when unset)."})
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size."})
    task_source: str = field(
        default="auto", metadata={"help": "pack: the offline task pack; hub: lm-eval's usual datasets; auto: hub when "
                                          "it is reachable, else the pack.", "choices": ["auto", "pack", "hub"]}
    )
    skip_base: bool = field(default=False, metadata={"help": "With --adapter, evaluate only the tuned model."})
    seed: int = field(default=1234, metadata={"help": "lm-eval's random seeds (few-shot sampling)."})

    def __post_init__(self):
        self.task_names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not self.task_names and not self.task_file:
            raise UserError("Nothing to evaluate: pass --tasks (lm-eval names, e.g. arc_easy,piqa) or --task_file.")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive, got {self.limit}.")
        if self.limit is not None and self.limit >= 1:
            self.limit = int(self.limit)
        if self.skip_base and not self.adapter:
            raise UserError("--skip_base needs --adapter (otherwise nothing would be evaluated).")

