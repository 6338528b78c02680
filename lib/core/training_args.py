"""Arguments every trainer script shares: TrainingArguments that work on CPU-only machines under torchrun and
DeepSpeed, an output folder that never mixes two runs, held-out data checked before any model loads.

Kept apart from the Trainer itself so that ``--help`` and argument errors need no heavy imports.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint

from lib.core.args import given_settings, resume_argument
from lib.core.errors import UserError

# What the trainer scripts write into --output_dir; --overwrite_output_dir removes exactly these (a user's own files
# in that folder stay).
RUN_OUTPUTS = (
    "checkpoint-*", "runs", "merged", "metrics.jsonl", "README.md", "trainable.safetensors", "model.safetensors",
    "model-*-of-*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "adapter_config.json",
    "config.json", "generation_config.json", "router_config.json", "encoder_config.json", "trainer_state.json",
    "training_args.bin", "all_results.json", "train_results.json", "eval_results.json", "tokenizer.json",
    "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.jinja", "memory_config.json", "memory_bank.jsonl", "memory_summary.json",
)


def adapt_to_cpu_only_machines(args: TrainingArguments) -> None:
    """Settings that make any TrainingArguments work on CPU-only machines under torchrun and DeepSpeed.

    Call at the start of ``__post_init__``, before TrainingArguments sets up the distributed state.
    """
    if not torch.cuda.is_available():
        # Pinned memory only helps host-to-GPU copies; on CPU it just warns.
        args.dataloader_pin_memory = False
        if args.deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Without use_cpu, a CPU-only launch is not recognised as distributed: every process would
            # silently train alone (torchrun) or DeepSpeed would count the wrong number of processes.
            args.use_cpu = True


@dataclass
class RunArguments:
    """Settings every trainer script adds to the Trainer's own."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an earlier run's outputs in --output_dir (a non-empty folder is "
                                         "refused otherwise, unless resuming)."}
    )
    callbacks: list[str] | None = field(
        default=None, metadata={"help": "Your own TrainerCallback classes as module:Class (a list in a recipe). Each "
                                        "runs fault-isolated: an exception in it is a warning, never the end of "
                                        "training."}
    )


@dataclass
class FrozenBackboneTrainingArguments(RunArguments, TrainingArguments):
    """TrainingArguments that also work on CPU-only machines under torchrun and DeepSpeed."""

    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every trained component gets a gradient every step, so DDP need not search "
                                         "for unused ones (searching also breaks losses computed from captured "
                                         "router logits: 'marked as ready twice')."}
    )

    def __post_init__(self):
        adapt_to_cpu_only_machines(self)
        super().__post_init__()


def prepare_output_dir(args: TrainingArguments) -> str | bool | None:
    """Refuse to mix two runs in one --output_dir; return what ``train(resume_from_checkpoint=...)`` needs.

    A folder that holds an earlier run is refused unless the run resumes (``--resume_from_checkpoint``) or
    ``--overwrite_output_dir`` asks to replace it, in which case that run's outputs are removed first. Call it
    before loading any model, on every rank (only rank 0 removes anything).
    """
    resume = resume_argument(args.resume_from_checkpoint)
    if resume is True:
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if resume is None:
            raise UserError(f"--resume_from_checkpoint true: {args.output_dir} holds no checkpoint-N folder to resume "
                            "from; drop the flag to start a new run.")
    elif resume and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume} is not a folder; pass a checkpoint-N folder of an earlier "
                        "run, or `true` for the newest one in --output_dir.")
    if resume:
        return resume
    existing = os.path.isdir(args.output_dir) and [n for n in os.listdir(args.output_dir) if not n.startswith(".")]
    if existing:
        if not getattr(args, "overwrite_output_dir", False):
            shown = ", ".join(sorted(existing)[:3]) + (", ..." if len(existing) > 3 else "")
            raise UserError(f"--output_dir {args.output_dir} is not empty ({shown}); pass --overwrite_output_dir to "
                            "replace an earlier run's outputs, --resume_from_checkpoint true to continue it, or choose "
                            "another folder.")
        if args.process_index == 0:
            for pattern in RUN_OUTPUTS:
                for path in glob.glob(os.path.join(args.output_dir, pattern)):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
    return None


def check_eval_data(args: TrainingArguments, has_eval_data: bool) -> None:
    """Evaluation during training needs held-out rows: say so before any model loads.

    When the evaluation strategy is only a script's default (the user did not write it), a run
    without held-out rows simply does not evaluate.
    """
    if has_eval_data:
        return
    given = given_settings(args)
    if args.eval_strategy != IntervalStrategy.NO:
        if "eval_strategy" in given:
            raise UserError(f"--eval_strategy {args.eval_strategy.value} evaluates held-out rows, and there are none; "
                            "pass --validation_file (or --validation_split_percentage N), or set --eval_strategy no.")
        args.eval_strategy = IntervalStrategy.NO
        args.do_eval = False
    if getattr(args, "eval_on_start", False):
        if "eval_on_start" in given:
            raise UserError("--eval_on_start evaluates held-out rows, and there are none; pass --validation_file, or "
                            "drop --eval_on_start.")
        args.eval_on_start = False
