"""How every script loads its model: ``--model_name_or_path`` and friends, with optional sparse upcycling."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.core.errors import UserError

CHOICES_DTYPE = ["auto", "float32", "bfloat16", "float16"]


CHOICES_ATTN = ["flash_attention_2", "sdpa", "eager"]


CHOICES_EXPERTS = ["eager", "grouped_mm", "batched_mm"]


@dataclass
class ModelLoadArguments:
    """How to load the model; scripts whose training arguments already carry trust_remote_code (TRL) use this."""

    model_name_or_path: str = field(
        metadata={"help": "Hub id, local path, or builtin name (builtin:smollm2-135m-instruct, builtin:tiny-<arch>)."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.", "choices": CHOICES_DTYPE},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel; unavailable ones fall back (flash_attention_2 -> sdpa -> eager).",
                  "choices": CHOICES_ATTN},
    )
    experts_implementation: str | None = field(
        default=None,
        metadata={"help": "MoE experts kernel (transformers' choice when unset).", "choices": CHOICES_EXPERTS},
    )
    upcycle_experts: int = field(
        default=0, metadata={"help": "Turn a dense Llama/Mistral/Qwen3 model into an MoE with this many experts (0: off)."}
    )
    upcycle_top_k: int = field(default=2, metadata={"help": "Experts routed per token in the upcycled model."})
    upcycle_noise: float = field(
        default=0.0, metadata={"help": "Relative std of seeded noise added to each expert copy (0: exact copies)."}
    )
    upcycle_seed: int = field(default=0, metadata={"help": "Seed of the fresh routers and expert noise."})

    def __post_init__(self):
        if self.upcycle_experts < 0 or self.upcycle_experts == 1:
            raise UserError(f"--upcycle_experts must be 0 (off) or at least 2, got {self.upcycle_experts}.")
        if self.upcycle_experts and not 1 <= self.upcycle_top_k <= self.upcycle_experts:
            raise UserError(
                f"--upcycle_top_k must be between 1 and --upcycle_experts ({self.upcycle_experts}), got {self.upcycle_top_k}."
            )
        if self.upcycle_noise < 0:
            raise UserError(f"--upcycle_noise must be >= 0, got {self.upcycle_noise}.")


@dataclass
class ModelArguments(ModelLoadArguments):
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub. Off by default for safety."}
    )

