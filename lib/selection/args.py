"""Arguments of the data-selection scripts: router training data and trainer knobs (train_router.py), scoring and
selection (select_data.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.core.errors import UserError
from lib.core.training_args import FrozenBackboneTrainingArguments
from lib.models.args import CHOICES_ATTN, CHOICES_DTYPE, CHOICES_EXPERTS
from lib.selection.corruptions import CORRUPTIONS
from lib.selection.scores import BASELINE_SCORES, SCORES

SCORE_TOKENS = ["all", "assistant"]


@dataclass
class RouterDataArguments:
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
    score_tokens: str = field(
        default="all", metadata={"help": "Tokens the routing loss and the row scores read: all, or only the assistant "
                                         "turns of chat rows (the question is still read as context; recorded in "
                                         "router_config.json for select_data.py).", "choices": SCORE_TOKENS})
    append_eos: bool = field(
        default=True, metadata={"help": "Text rows: append the tokenizer's EOS token to each row that fits in "
                                        "max_seq_length, so the last position reads the whole row and a row that stops "
                                        "early differs from the start of a longer one (chat rows end with their "
                                        "template's end-of-turn token already). Recorded in router_config.json."})
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
        if self.score_tokens == "assistant" and not self.messages_field:
            raise UserError("--score_tokens assistant reads the assistant turns of chat rows: pass --messages_field.")
        unknown = [k for k in self.kinds() if k not in CORRUPTIONS]
        if unknown or not self.kinds():
            raise UserError(
                f"--synthetic_kinds has unknown corruption(s) {unknown}; choose from {', '.join(CORRUPTIONS)}."
            )

    def kinds(self) -> list[str]:
        return [k.strip() for k in self.synthetic_kinds.split(",") if k.strip()]


@dataclass
class RouterTrainingArguments(FrozenBackboneTrainingArguments):
    router_type: str = field(default="moe", metadata={
        "help": "Which routers to train: moe (data selection), or memory_gate (explicit memory; other flags then).",
        "choices": ["moe"]})
    garbage_expert_ratio: float = field(
        default=0.25, metadata={"help": "Share of each layer's experts that form the garbage bin."}
    )
    garbage_selection: str = field(
        default="index",
        metadata={"help": "index: the last experts; probe: the experts garbage probe rows are routed to most.",
                  "choices": ["index", "probe"]},
    )
    probe_samples: int = field(default=64, metadata={"help": "Garbage and good rows each used by garbage_selection=probe."})
    router_gradient: str = field(
        default="full",
        metadata={"help": "full: exact gradients through the network (LM term included). local: each router "
                          "learns from its own logits only (routing + balancing losses), about 2x faster with no "
                          "activations kept; exact for freshly upcycled identical experts, an approximation "
                          "otherwise. Needs --lm_loss_coef 0; not available under ZeRO-3.",
                  "choices": ["full", "local"]},
    )
    lm_loss_coef: float = field(default=1.0, metadata={"help": "Weight of the LM loss on good rows."})
    route_loss_coef: float = field(default=1.0, metadata={"help": "Weight of the garbage-routing loss."})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    schedule: str | None = field(
        default=None,
        metadata={"help": "JSON list (or YAML list in a recipe) annealing/switching lm_loss_coef, "
                          "route_loss_coef or aux_loss_coef by epoch; see lib/core/callbacks.py."},
    )
    save_full_model: bool = field(
        default=False, metadata={"help": "Also write a complete transformers checkpoint (backbone included) to "
                                         "--output_dir at the end, e.g. to push a standalone model; checkpoints hold "
                                         "only the trained routers either way."}
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Routers are small and often freshly initialised: a high rate suits them."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch by default."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the quality column."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.garbage_expert_ratio < 1:
            raise UserError(f"--garbage_expert_ratio must be strictly between 0 and 1, got {self.garbage_expert_ratio}.")
        for name in ("lm_loss_coef", "route_loss_coef", "aux_loss_coef"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.router_gradient == "local":
            if self.route_loss_coef == 0 and self.aux_loss_coef == 0:
                raise UserError("--router_gradient local trains routers through the routing and balancing losses "
                                "only; set --route_loss_coef or --aux_loss_coef above 0.")
            if self.lm_loss_coef > 0:
                raise UserError("--router_gradient local trains routers through the routing losses only, so the LM "
                                "term cannot reach them; set --lm_loss_coef 0 or use --router_gradient full.")
            ds_config = getattr(self, "hf_deepspeed_config", None)
            if ds_config is not None and ds_config.is_zero3():
                raise UserError("--router_gradient local is not available under ZeRO-3 (DeepSpeed reduces router "
                                "gradients with a backward hook of the MoE block, which local gradients bypass); "
                                "use --router_gradient full or ZeRO-2.")
        if self.probe_samples < 1:
            raise UserError(f"--probe_samples must be at least 1, got {self.probe_samples}.")


@dataclass
class SelectArguments:
    router_model: str = field(
        metadata={"help": "A train_router.py checkpoint (folder with router_config.json). For --score perplexity, "
                          "ifd or probe any causal LM works (hub id, local path or builtin name); --score fasttext "
                          "reads only its tokenizer's chat template, for chat rows."}
    )
    data_file: str = field(metadata={"help": "The pool: .jsonl/.json/.parquet/.csv file or a `datasets` hub name."})
    output_dir: str = field(metadata={"help": "Where scored.*, selected.*, summary.json and scores.png go."})
    split: str = field(default="train", metadata={"help": "Split of a hub dataset or saved DatasetDict."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    text_field: str = field(default="text", metadata={"help": "Column holding plain text."})
    messages_field: str | None = field(
        default=None, metadata={"help": "Column holding chat messages (rendered with the chat template)."}
    )
    score: str = field(
        default="quality_score",
        metadata={"help": "Score used for ranking. quality_score: 1 - mean garbage-bin mass; quality_logodds: mean "
                          "logsumexp(quality logits) - logsumexp(garbage logits); routed_share: share of top-k slots "
                          "on quality experts; perplexity: the model's own perplexity (lower is better); ifd: "
                          "instruction-following difficulty of chat rows; fasttext: P(good) of a fastText classifier "
                          "trained on --baseline_train_file; probe: P(good) of a logistic-regression probe on the "
                          "model's mean-pooled hidden states, trained on --baseline_train_file.",
                  "choices": SCORES.names()},
    )
    score_tokens: str | None = field(
        default=None, metadata={"help": "Tokens a row's score reads: all, or only the assistant turns of chat rows "
                                        "(the rest is still read as context). Default: what the routers were trained "
                                        "on (router_config.json), else all.", "choices": SCORE_TOKENS})
    select_ratio: float | None = field(
        default=None, metadata={"help": "Keep this fraction of the pool (default 0.3 when no other mode is set)."}
    )
    select_top_k: int | None = field(default=None, metadata={"help": "Keep this many rows."})
    score_threshold: float | None = field(
        default=None, metadata={"help": "Keep rows whose selection_score is at least this."}
    )
    output_format: str = field(default="jsonl", metadata={"help": "Format of scored/selected.", "choices": ["jsonl", "parquet"]})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Rows are truncated (and flagged) beyond this; default: the checkpoint's "
                                        "training length, else 512."}
    )
    batch_size: int = field(default=32, metadata={"help": "Most rows per forward pass."})
    max_batch_tokens: int = field(
        default=8192, metadata={"help": "Most padded tokens per forward pass (rows x longest row)."}
    )
    shard_size: int | None = field(
        default=None, metadata={"help": "Rows per shard: the unit of resuming and of sharing work between processes "
                                        "(default: about 64 shards of 16 to 2048 rows)."}
    )
    resume: bool = field(default=False, metadata={"help": "Reuse the shards an interrupted run left in --output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Discard earlier results in --output_dir."})
    max_samples: int | None = field(default=None, metadata={"help": "Score only the first N rows (for a quick look)."})
    dtype: str = field(
        default="auto", metadata={"help": "Model dtype; auto = bfloat16 on GPU, float32 on CPU. Scores are fp32.",
                                  "choices": CHOICES_DTYPE}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel (flash_attention_2 -> sdpa -> eager fallback).",
                                "choices": CHOICES_ATTN}
    )
    experts_implementation: str | None = field(
        default=None, metadata={"help": "MoE experts kernel (transformers' default when unset).",
                                "choices": CHOICES_EXPERTS}
    )
    baseline_train_file: str | None = field(
        default=None, metadata={"help": "Labelled rows the fasttext and probe baselines train on, in train_router.py's "
                                        "--train_file format: the pool's text (or messages) field and a 0/1 label."})
    baseline_label_field: str = field(
        default="label", metadata={"help": "Column of --baseline_train_file with 1 (good) / 0 (garbage)."})
    baseline_seed: int = field(default=0, metadata={"help": "Seed of the fasttext and probe baselines' training."})
    # fastText's own defaults (5 epochs, lr 0.1) are for millions of rows; a labelled file of hundreds or thousands
    # of rows needs more passes, as fastText's tutorial suggests for small sets.
    fasttext_epoch: int = field(default=25, metadata={"help": "fastText training epochs."})
    fasttext_lr: float = field(default=0.5, metadata={"help": "fastText learning rate."})
    fasttext_word_ngrams: int = field(
        default=2, metadata={"help": "Longest word n-gram fastText reads (2, as in DCLM's classifier)."})
    fasttext_dim: int = field(default=100, metadata={"help": "fastText embedding size."})
    probe_layer: int | None = field(
        default=None, metadata={"help": "Which hidden states the probe reads, as indexed in transformers' "
                                        "output_hidden_states: 0 = the embeddings, L = the output of decoder layer L "
                                        "(counting from 1; the last as the model family returns it). Default: the "
                                        "middle, num_hidden_layers // 2."})
    probe_c: float = field(
        default=1.0, metadata={"help": "Inverse L2 strength of the probe's logistic regression (scikit-learn's C)."})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of --router_model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self):
        modes = [m for m in ("select_ratio", "select_top_k", "score_threshold") if getattr(self, m) is not None]
        if len(modes) > 1:
            raise UserError(f"Choose one selection mode, got {', '.join('--' + m for m in modes)}.")
        if not modes:
            self.select_ratio = 0.3
        if self.select_ratio is not None and not 0 < self.select_ratio <= 1:
            raise UserError(f"--select_ratio must be in (0, 1], got {self.select_ratio}.")
        if self.select_top_k is not None and self.select_top_k < 1:
            raise UserError(f"--select_top_k must be at least 1, got {self.select_top_k}.")
        for name in ("batch_size", "max_batch_tokens", "shard_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise UserError(f"--max_seq_length must be at least 2, got {self.max_seq_length}.")
        if self.score_tokens == "assistant" and not self.messages_field:
            raise UserError("--score_tokens assistant reads the assistant turns of chat rows: pass --messages_field.")
        if self.score == "ifd" and self.score_tokens == "assistant":
            raise UserError("--score ifd already scores only the answer; leave --score_tokens unset.")
        if self.score in BASELINE_SCORES:
            self._check_baseline()
        if self.score == "ifd" and not self.messages_field:
            raise UserError("--score ifd compares the answer's loss with and without its question, so it needs chat "
                            "rows: pass --messages_field.")


    def _check_baseline(self) -> None:
        if not self.baseline_train_file:
            raise UserError(f"--score {self.score} is a supervised baseline that trains on labelled rows: pass "
                            "--baseline_train_file (rows with the pool's text or messages field and a 0/1 "
                            f"'{self.baseline_label_field}' column, as train_router.py's --train_file).")
        if self.score_tokens == "assistant":
            raise UserError(f"--score {self.score} reads whole rows; leave --score_tokens unset.")
        for name in ("fasttext_epoch", "fasttext_word_ngrams", "fasttext_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("fasttext_lr", "probe_c"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}.")
        if self.probe_layer is not None and self.probe_layer < 0:
            raise UserError(f"--probe_layer must be >= 0, got {self.probe_layer}.")
