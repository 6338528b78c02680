"""Arguments of the explicit-memory stages (train_router.py --router_type memory_gate, train_fusion.py,
train_joint.py, train_memory.py --memory_type explicit)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.core.errors import UserError
from lib.core.training_args import FrozenBackboneTrainingArguments


@dataclass
class MemoryDataArguments:
    memory_bank: str = field(metadata={"help": "Bank file: JSON lines {id?, text}, or a run folder holding "
                                               "memory_bank.jsonl."})
    train_file: str = field(metadata={"help": "Rows {question, answer, memory_id} or chat rows {messages, "
                                              "memory_id?}."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out rows, same format."})
    max_length: int = field(default=160, metadata={"help": "Longest row in tokens (longer rows are refused)."})
    max_entry_tokens: int = field(default=16, metadata={"help": "Longest bank entry in tokens."})
    truncate_entries: bool = field(default=False, metadata={"help": "Cut longer entries instead of refusing them."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use a seeded sample of this many rows."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Evaluate a seeded sample of this many rows."})
    general_file: str | None = field(default=None, metadata={"help": "General instruction rows (no memory_id) mixed "
                                                                     "in so general ability is kept."})
    general_mix_ratio: float = field(default=0.0, metadata={"help": "Share of general rows in the training mix."})

    def __post_init__(self):
        if not 0 <= self.general_mix_ratio < 1:
            raise UserError(f"--general_mix_ratio must be in [0, 1), got {self.general_mix_ratio}.")
        if self.general_mix_ratio > 0 and not self.general_file:
            raise UserError("--general_mix_ratio needs --general_file (rows of general instruction data).")
        if self.max_entry_tokens < 1:
            raise UserError(f"--max_entry_tokens must be positive, got {self.max_entry_tokens}.")


@dataclass
class MemoryModelArguments:
    init_from: str | None = field(default=None, metadata={"help": "Output folder of the previous stage: its memory "
                                                                  "parts and settings are the starting point."})
    query_layer: int | None = field(default=None, metadata={"help": "Layer whose hidden states query the gate "
                                                                    "(default: two fifths of the way up)."})
    fusion_layers: str | None = field(default=None, metadata={"help": "Comma-separated layers that read the "
                                                                      "retrieved entries (default: every layer from "
                                                                      "the query layer up)."})
    memory_source: str = field(default="hidden", metadata={
        "help": "Entry tokens as the frozen model's hidden states at each fusion layer, or its token embeddings.",
        "choices": ["hidden", "embedding"]})
    key_dim: int = field(default=128, metadata={
        "help": "Width of gate keys (a multiple of 4: an entity half, a relation + entity half)."})
    top_k: int = field(default=4, metadata={"help": "Entries retrieved per position."})
    candidates: int = field(default=24, metadata={"help": "Rows and columns of the product-key grid kept per "
                                                          "half; candidates^2 cells are re-ranked exactly (the cost "
                                                          "of a lookup grows with it, not with the bank)."})

    def layers(self) -> list[int] | None:
        if self.fusion_layers in (None, ""):
            return None
        try:
            return sorted({int(x) for x in str(self.fusion_layers).replace(" ", "").split(",") if x})
        except ValueError:
            raise UserError(f"--fusion_layers must be comma-separated layer numbers, got {self.fusion_layers}."
                            ) from None


@dataclass
class MemoryTrainingArguments(FrozenBackboneTrainingArguments):
    retrieval: str = field(default="gate", metadata={"help": "Entries the fusion reads while training: the gate's, "
                                                             "or each row's gold entry.",
                                                     "choices": ["gate", "gold"]})
    gate_loss_coef: float = field(default=1.0, metadata={"help": "Weight of the gate's cross-entropy on rows with a "
                                                                 "memory_id (joint and memory stages)."})
    similarity_loss_coef: float = field(default=0.0, metadata={"help": "Weight of -mean cosine of query and "
                                                                       "chosen entry keys (schedulable)."})
    diversity_loss_coef: float = field(default=0.0, metadata={"help": "Weight of the mean pairwise cosine of the "
                                                                      "retrieved entries' keys (schedulable)."})
    gumbel_temperature: float | None = field(default=None, metadata={
        "help": "Straight-through Gumbel-softmax over the retrieved entries at this temperature while training "
                "(schedulable; null: soft weights)."})
    train_gate: float = field(default=1.0, metadata={"help": "1 trains the gate, 0 holds it (schedulable: "
                                                             "switch it on at an epoch)."})
    teacher_top_k: int = field(default=8, metadata={"help": "Rows without memory_id: entries the soft teacher "
                                                            "spreads its target over."})
    teacher_temperature: float = field(default=0.05, metadata={"help": "Softmax temperature of the soft teacher."})
    query_cache_gb: float = field(default=4.0, metadata={
        "help": "Gate stage: the frozen backbone's query-layer states of the training and held-out rows are computed "
                "once and kept in memory when they fit in this many GB (0: run the backbone at every step)."})
    placement_refresh_steps: int = field(default=20, metadata={
        "help": "While the gate trains, place the entries in the product-key grid again every N steps (0: per epoch)."})
    schedule: str | None = field(default=None, metadata={"help": "JSON list (a YAML list in a recipe) of value "
                                                                  "schedules, e.g. gumbel_temperature 1.5 -> 0.5."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    fusion_gate_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the fusion gates (alpha) and null logits, without weight decay; they start shut and "
                "must move far, while the copied attention weights move little (default: --learning_rate)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per device per step."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps (alpha every step by default)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate held-out rows."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep memory_index in the batches."})

    def __post_init__(self):
        super().__post_init__()
        if self.gumbel_temperature is not None and self.gumbel_temperature <= 0:
            raise UserError(f"--gumbel_temperature must be positive, got {self.gumbel_temperature}.")
        if self.teacher_top_k < 1 or self.teacher_temperature <= 0:
            raise UserError("--teacher_top_k must be at least 1 and --teacher_temperature positive.")


@dataclass
class GateStageArguments:
    router_type: str = field(default="memory_gate", metadata={"help": "memory_gate: train the explicit-memory gate.",
                                                               "choices": ["memory_gate"]})


@dataclass
class MemoryTypeArguments:
    memory_type: str = field(default="explicit", metadata={"help": "Which memory to train (explicit: bank + gate + "
                                                                   "fusion; recall: <recall> token + projector + "
                                                                   "LoRA from chat logs).",
                                                           "choices": ["explicit", "recall"]})
