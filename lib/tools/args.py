"""Arguments of pretrain_encoder.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.core.errors import UserError
from lib.core.training_args import FrozenBackboneTrainingArguments
from lib.tools.embeddings import POOLINGS


@dataclass
class EncoderDataArguments:
    tools_file: str = field(metadata={"help": "JSON list of {name, description, resources: {...numbers}}."})
    train_file: str = field(metadata={"help": "Rows of {query, tool, kind?}; kind 'resource' marks queries that only "
                                              "resource facts settle."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out queries, same format."})


@dataclass
class EncoderTrainingArguments(FrozenBackboneTrainingArguments):
    pooling: str = field(default="prompt_last", metadata={
        "help": "How the LLM's hidden states become one vector: mean, weighted_mean (later tokens weigh more), last "
                "(the last token), prompt_last (the last token of 'This sentence: \"<text>\" means in one word: "
                "\"', PromptEOL).", "choices": list(POOLINGS)})
    embedding_layer: int = field(default=-1, metadata={
        "help": "Read the hidden states after this decoder layer (-1: the last, after the final norm; e.g. the "
                "middle layer, num_hidden_layers // 2)."})
    d_resource: int | None = field(default=None, metadata={"help": "Width of the resource MLP (null: hidden size)."})
    num_attention_heads: int = field(default=8, metadata={"help": "Heads of the fusion's attention."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout inside the fusion's attention."})
    temperature: float = field(default=0.05, metadata={"help": "Softmax temperature of the cosine scores."})
    resource_loss_coef: float = field(
        default=1.0, metadata={"help": "Weight of the resource-only term on resource-dependent queries."}
    )
    group_loss_coef: float = field(default=1.0, metadata={
        "help": "Weight of the hard-negative term: each query against only the tools of its tool's 'group' in "
                "tools.json (the tools that do the same job, where resources decide). 0: off; no effect without "
                "groups."})
    balance_tools: bool = field(default=True, metadata={
        "help": "Weigh each training query of the tool term by 1 / (queries of its tool), so that a tool with few "
                "queries (a lone tool's handful of semantic examples) counts as much as a pair member with "
                "thousands of generated resource queries."})
    query_lora_r: int = field(default=0, metadata={
        "help": "Rank of LoRA adapters on the LLM that encodes the queries (all its linear layers; they start at "
                "zero, so step 0 is still pure semantics), trained with the encoder at --query_learning_rate: "
                "queries learn which resource their wish names. 0: frozen queries, embedded once and cached."})
    query_lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha of the query adapters "
                                                                           "(null: twice the rank)."})
    query_learning_rate: float = field(default=1e-3, metadata={
        "help": "AdamW learning rate of the query adapters (1e-3 beat 5e-4 on the second tool set's held-out queries "
                "at three seeds and tied on the example set; README)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Queries per device per step."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps (gate/alpha every step by default)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate held-out queries (without "
                                                                  "--validation_file: never)."})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate held-out queries before the first step too: "
                                                                "the accuracy of pure semantics (gate shut)."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the precomputed query embeddings."})

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}.")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.group_loss_coef < 0:
            raise UserError(f"--group_loss_coef must be 0 or more, got {self.group_loss_coef}.")
        if self.query_lora_r < 0:
            raise UserError(f"--query_lora_r must be 0 (frozen queries) or a positive rank, got {self.query_lora_r}.")
        if self.d_resource is not None and self.d_resource < 1:
            raise UserError(f"--d_resource must be positive or null, got {self.d_resource}.")

