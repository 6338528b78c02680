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
    log_samples: bool = field(default=False, metadata={
        "help": "Also write samples.jsonl: each question's score in each run (run, task, doc_id, acc, acc_norm), "
                "for paired comparisons between runs."})
    memory_model: str | None = field(default=None, metadata={
        "help": "Output folder of an explicit-memory stage: measure it on --qa_file (and --tasks with its bank)."})
    memory_bank: str | None = field(default=None, metadata={"help": "Bank for --memory_model (default: its own)."})
    qa_file: str | None = field(default=None, metadata={"help": "QA rows {question, answer, memory_id, choices?} "
                                                                "for --memory_model."})
    counterfactual_bank: str | None = field(default=None, metadata={
        "help": "An edited bank (same ids): how often the memory model's answer follows the edit "
                "(rows' counterfactual_answer)."})
    irrelevant_bank: str | None = field(default=None, metadata={"help": "A bank without the asked entries."})
    qa_limit: int | None = field(default=None, metadata={"help": "Score a seeded sample of this many QA rows."})
    max_new_tokens: int = field(default=12, metadata={"help": "Greedy answer length for exact match."})
    recall_model: str | None = field(default=None, metadata={
        "help": "Output folder of train_memory.py --memory_type recall: answer --probe_file with recall, without "
                "memory and with the gold memory text (results.json / results.md), and --tasks for base vs recall "
                "model."})
    probe_file: str | None = field(default=None, metadata={
        "help": "Questions for --recall_model: {user_id, question, answer} rows, optional memory (gold text) and "
                "kind."})
    probe_limit: int | None = field(default=None, metadata={"help": "Answer a seeded sample of this many probes."})

    def __post_init__(self):
        self.task_names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if self.recall_model and self.memory_model:
            raise UserError("--recall_model and --memory_model cannot be combined; evaluate them separately.")
        if (self.probe_file or self.probe_limit is not None) and not self.recall_model:
            raise UserError("--probe_file belongs to --recall_model; pass the recall model's folder.")
        if self.recall_model and not self.probe_file and not self.task_names:
            raise UserError("--recall_model needs --probe_file (questions about users' memories) or --tasks.")
        if self.recall_model and self.adapter:
            raise UserError("--recall_model and --adapter cannot be combined; evaluate them separately.")
        if not self.task_names and not self.task_file and not self.memory_model and not self.recall_model:
            raise UserError("Nothing to evaluate: pass --tasks (lm-eval names, e.g. arc_easy,piqa) or --task_file.")
        memory_flags = [n for n in ("memory_bank", "qa_file", "counterfactual_bank", "irrelevant_bank", "qa_limit")
                        if getattr(self, n) is not None]
        if memory_flags and not self.memory_model:
            raise UserError(f"--{memory_flags[0]} belongs to --memory_model; pass the memory model's folder.")
        if self.memory_model and not self.qa_file and not self.task_names and not self.task_file:
            raise UserError("--memory_model needs --qa_file (QA rows with memory_id) or --tasks to measure.")
        if self.memory_model and self.adapter:
            raise UserError("--memory_model and --adapter cannot be combined; evaluate them separately.")
        if self.counterfactual_bank and not self.qa_file:
            raise UserError("--counterfactual_bank needs --qa_file (rows with counterfactual_answer).")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be positive, got {self.limit}.")
        if self.limit is not None and self.limit >= 1:
            self.limit = int(self.limit)
        if self.skip_base and not self.adapter:
            raise UserError("--skip_base needs --adapter (otherwise nothing would be evaluated).")

