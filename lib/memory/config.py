"""The settings that rebuild explicit memory's parts around a backbone (memory_config.json), and their defaults."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from lib.core.errors import UserError
from lib.core.files import write_json

CONFIG_FILE = "memory_config.json"


@dataclass
class MemoryConfig:
    """Everything needed to rebuild the memory parts around a backbone (saved as memory_config.json)."""

    base_model: str
    hidden_size: int
    num_layers: int
    base_model_revision: str | None = None
    query_layer: int = 12
    fusion_layers: list[int] = field(default_factory=lambda: list(range(12, 31)))
    memory_source: str = "hidden"  # entry tokens as the fusion layer's hidden states, or "embedding"
    key_dim: int = 128
    top_k: int = 4
    candidates: int = 24
    max_entry_tokens: int = 16
    stage: str = ""
    bank_size: int = 0
    bank_fingerprint: str = ""

    def check(self) -> None:
        where = "memory settings"
        if not 1 <= self.query_layer <= self.num_layers:
            raise UserError(f"{where}: --query_layer {self.query_layer} must be between 1 and the backbone's "
                            f"{self.num_layers} layers.")
        if not self.fusion_layers:
            raise UserError(f"{where}: --fusion_layers is empty; name at least one layer.")
        bad = [f for f in self.fusion_layers if not self.query_layer <= f <= self.num_layers]
        if bad:
            raise UserError(f"{where}: fusion layer(s) {bad} must lie between --query_layer {self.query_layer} "
                            f"(retrieval happens there) and the backbone's {self.num_layers} layers.")
        if self.memory_source not in ("hidden", "embedding"):
            raise UserError(f"{where}: --memory_source must be hidden or embedding, not {self.memory_source}.")
        if self.key_dim < 4 or self.key_dim % 4:
            raise UserError(f"{where}: --key_dim must be a positive multiple of 4, got {self.key_dim}.")
        if self.top_k < 1 or self.candidates < 1:
            raise UserError(f"{where}: --top_k and --candidates must be at least 1.")

    def save(self, output_dir: str) -> None:
        write_json(os.path.join(output_dir, CONFIG_FILE), asdict(self))

    @classmethod
    def load(cls, folder: str) -> MemoryConfig:
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.exists(path):
            raise UserError(f"{folder} holds no {CONFIG_FILE}; pass the output folder of train_router.py "
                            "--router_type memory_gate, train_fusion.py, train_joint.py or train_memory.py.")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def default_layers(num_layers: int) -> tuple[int, list[int]]:
    """Query layer at ~40% of the depth (middle layers tell what a question asks about; measured on SmolLM2, whose
    layer 4 generalised to unseen phrasings far worse than layer 12), fusion at every layer from there up: reading
    an entry the way context is read takes many layers (on SmolLM2 with the gold entry and untrained fusions,
    layers 12-30 recovered about half of the in-context accuracy, two layers almost none)."""
    query = max(1, round(num_layers * 0.4))
    return query, list(range(query, num_layers + 1))
