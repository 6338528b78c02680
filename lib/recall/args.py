"""Arguments of train_memory.py --memory_type recall (the model itself comes from lib.models.args.ModelArguments)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.core.errors import UserError
from lib.core.training_args import FrozenBackboneTrainingArguments
from lib.recall.vectors import VECTOR_TEMPLATE


@dataclass
class RecallDataArguments:
    chat_logs: str | None = field(default=None, metadata={
        "help": "Chat logs: a .jsonl / .json / .parquet file or a folder of them, rows {conversation_id, user_id, "
                "timestamp, messages}. Only conversations that are new or changed since the last run are read."})
    memories_file: str | None = field(default=None, metadata={
        "help": "Memory entries written elsewhere ({user_id, text} rows, or {user_id, memory}): used as they are, "
                "instead of extracting them from --chat_logs."})
    qa_file: str | None = field(default=None, metadata={
        "help": "Questions to train answering on: {user_id, question, answer} rows (optional \"memory\": its gold "
                "entry text, always among the slots of its row when it is an entry)."})
    sft_file: str | None = field(default=None, metadata={
        "help": "Ordinary instruction conversations ({messages} rows) mixed in so general ability is kept."})
    sft_mix_ratio: float = field(default=0.1, metadata={
        "help": "Instruction rows per memory row (0.1: one in ten)."})
    sft_loss: str = field(default="kl", metadata={
        "help": "The instruction rows' loss. kl: the KL divergence from the frozen base model's next-token "
                "distribution at their answer tokens (read with the LoRA off), so the rows hold the model to what "
                "it did before (on SmolLM2 PIQA acc_norm stayed at 0.66, against 0.56 with ce, and QA rose); ce: "
                "next-token loss on their answers (the model learns the rows' own replies).",
        "choices": ["ce", "kl"]})
    max_qa_rows: int | None = field(default=None, metadata={"help": "Use at most this many --qa_file rows (seeded)."})
    max_length: int = field(default=192, metadata={"help": "Longest training row in tokens."})

    def __post_init__(self):
        if not self.chat_logs and not self.memories_file:
            raise UserError("Give --chat_logs (conversations to extract memories from) or --memories_file (entries "
                            "written elsewhere).")
        if self.sft_mix_ratio < 0:
            raise UserError(f"--sft_mix_ratio must be 0 or more, got {self.sft_mix_ratio}.")


@dataclass
class RecallModelArguments:
    extractor_model: str | None = field(default=None, metadata={
        "help": "Model that turns user messages into memory entries (default: --model_name_or_path)."})
    extraction_batch_size: int = field(default=16, metadata={"help": "User messages per extraction batch."})
    extraction_max_new_tokens: int = field(default=24, metadata={"help": "Longest entry the extractor writes."})
    check_grounding: bool = field(default=True, metadata={
        "help": "Drop an extracted entry whose content words are not in its message (a small extractor invents)."})
    extraction_min_logprob: float = field(default=-0.5, metadata={
        "help": "Drop an extracted entry whose tokens the extractor gave a mean log-probability below this (it is "
                "less sure of what it invents); --extraction_min_logprob=-inf keeps all."})
    vector_layer: int = field(default=-1, metadata={
        "help": "Decoder layer whose last-token hidden state is the memory vector (-1: the last, normed)."})
    vector_template: str = field(default=VECTOR_TEMPLATE, metadata={
        "help": "Prompt around a text before its last-token state is read ({text} is the text)."})
    top_k: int = field(default=3, metadata={"help": "Memories retrieved per question: one <recall> slot each."})
    query_adapter_epochs: int = field(default=10, metadata={
        "help": "Epochs of the query adapter trained on the --qa_file questions (a residual linear map on question "
                "vectors; questions search with the mean of its cosine and the frozen one); 0: none."})
    exact_index_limit: int = field(default=50_000, metadata={
        "help": "Up to this many entries the index is exact; above it, IVF (each user with at most a few "
                "thousand memories is still searched exactly over their own rows)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Modules that get LoRA: all-linear (every linear layer but the output head, whatever the "
                "architecture names them), or comma-separated module names (q_proj,v_proj)."})
    k_folds: int = field(default=0, metadata={
        "help": "K-fold cross-validation over memory entries before the final run (0: none): each fold's held-out "
                "reconstruction and their mean and std go into summary.json."})
    unanswerable_ratio: float = field(default=0.5, metadata={
        "help": "For this share of the training questions whose memory exists, also train a row whose slots are the "
                "user's nearest memories without it, answered \"I have no memory of that\" (0: none): the model "
                "learns to tell whether a slot answers the question instead of answering from any slot."})
    rehearsal_ratio: float = field(default=4.0, metadata={
        "help": "A rerun that continues the model also rehearses this many earlier entries per new one (at most all "
                "of them). With 1, a rerun on 10%% new conversations dropped reconstruction of earlier entries from "
                "0.83 to 0.36."})
    rerun_learning_rate_scale: float = field(default=0.25, metadata={
        "help": "A rerun that continues the model trains at this share of --learning_rate: at the full rate the "
                "same rerun left earlier entries' reconstruction at 0.56, at a quarter at 0.70 (0.83 before it)."})
    merge_adapter: bool = field(default=False, metadata={
        "help": "Also write the LoRA merged into the model (merged/), <recall> row included."})
    push_memories: bool = field(default=False, metadata={
        "help": "With --push_to_hub, also push the index and the entries (personal data: off by default)."})

    def __post_init__(self):
        if self.top_k < 1:
            raise UserError(f"--top_k must be at least 1, got {self.top_k}.")
        if self.k_folds == 1 or self.k_folds < 0:
            raise UserError(f"--k_folds must be 0 (none) or at least 2, got {self.k_folds}.")
        if not 0 < self.rerun_learning_rate_scale <= 1:
            raise UserError(f"--rerun_learning_rate_scale must be in (0, 1], got {self.rerun_learning_rate_scale}.")
        if not 0 <= self.unanswerable_ratio <= 1:
            raise UserError(f"--unanswerable_ratio must be in [0, 1], got {self.unanswerable_ratio}.")
        if self.rehearsal_ratio < 0:
            raise UserError(f"--rehearsal_ratio must be at least 0, got {self.rehearsal_ratio}.")
        if not self.lora_target_modules.strip(",  "):
            raise UserError("--lora_target_modules is empty; give all-linear or module names such as q_proj,v_proj.")
        if "{text}" not in self.vector_template:
            raise UserError("--vector_template must contain {text}.")


@dataclass
class RecallTrainingArguments(FrozenBackboneTrainingArguments):
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (LoRA, <recall> row, "
                                                                 "projector)."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Passes over the memory rows."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per device per step."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up: steps, or a share of them below 1."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept."})
    eval_strategy: str = field(default="no", metadata={"help": "Held-out reconstruction is measured after "
                                                               "training (summary.json)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep memory_ids and task in batches."})
    train_sampling_strategy: str = field(default="random", metadata={
        "help": "random (default), or group_by_length: batches of rows of similar length (less padding, a quarter "
                "faster steps here, but on a recall set its 50-batch megabatches put nearly a whole epoch in length "
                "order, blocks of one kind of row; reconstruction fell from 0.83 to 0.40 in the one run measured), "
                "sequential, batch_rebalance.",
        "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]})
    group_by_length: bool | None = field(default=None, metadata={
        "help": "The older name of --train_sampling_strategy group_by_length (true) or random (false)."})

    def __post_init__(self):
        # transformers 5 renamed group_by_length to train_sampling_strategy: the old flag still works here.
        if self.group_by_length is not None:
            self.train_sampling_strategy = "group_by_length" if self.group_by_length else "random"
        super().__post_init__()
