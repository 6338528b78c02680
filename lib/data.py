"""Dataset loading, text/chat rendering, labels, synthetic negatives, tokenisation and collation.

Files (.jsonl/.json/.parquet/.csv/.txt) and hub names all load through ``datasets``; every problem a user
can fix is reported as one sentence naming the file, the row and the field.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lib.errors import UserError

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class DataError(UserError):
    """A problem with the user's data, phrased as one actionable sentence."""


def load_rows(source: str, *, split: str = "train", config_name: str | None = None):
    """Load a local file or a hub dataset as a ``datasets.Dataset``; refuse empty or unreadable input."""
    import datasets

    datasets.disable_progress_bars()
    ext = os.path.splitext(source)[1].lower()
    if os.path.exists(source):
        if os.path.isdir(source):
            try:
                ds = datasets.load_from_disk(source)
            except Exception as err:  # noqa: BLE001 - re-raised as a user-facing sentence
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
            except Exception as err:  # noqa: BLE001
                raise DataError(f"Could not read {source} as {ext[1:]} ({type(err).__name__}: {err}).") from err
    elif ext in _BUILDERS:
        raise DataError(f"{source} does not exist; check the path.")
    else:
        try:
            ds = datasets.load_dataset(source, config_name, split=split)
        except Exception as err:  # noqa: BLE001
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


# --------------------------------------------------------------------------------------------------
# Synthetic negatives: corrupted copies of good rows
# --------------------------------------------------------------------------------------------------

_NOISE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789#@%&*!?~^"


def _shuffle(text: str, other: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _noise(text: str, other: str, rng: random.Random) -> str:
    # Replace about a third of the characters: still text-shaped, no longer language.
    return "".join(rng.choice(_NOISE_CHARS) if not c.isspace() and rng.random() < 0.35 else c for c in text)


def _truncate(text: str, other: str, rng: random.Random) -> str:
    words = text.split()
    keep = max(1, int(len(words) * rng.uniform(0.05, 0.25)))
    return " ".join(words[:keep])


def _repeat(text: str, other: str, rng: random.Random) -> str:
    words = text.split()
    span = max(1, min(len(words), rng.randint(2, 6)))
    start = rng.randrange(0, max(1, len(words) - span + 1))
    phrase = words[start:start + span]
    reps = max(3, len(words) // max(1, span))
    return " ".join(phrase * reps)


def _mismatch(text: str, other: str, rng: random.Random) -> str:
    # The first half of one row glued to the second half of an unrelated row.
    a, b = text.split(), other.split()
    return " ".join(a[: max(1, len(a) // 2)] + b[len(b) // 2:])


CORRUPTIONS: dict[str, Callable[[str, str, random.Random], str]] = {
    "shuffle": _shuffle,
    "noise": _noise,
    "truncate": _truncate,
    "repeat": _repeat,
    "mismatch": _mismatch,
}


def corrupt_text(text: str, other: str, kind: str, rng: random.Random) -> str:
    return CORRUPTIONS[kind](text, other, rng)


def corrupt_messages(messages: list[dict], other: list[dict], kind: str, rng: random.Random) -> list[dict]:
    """Corrupt the assistant turns; ``mismatch`` answers with another conversation's assistant turns."""
    other_answers = [m["content"] for m in other if m["role"] == "assistant"] or [
        m["content"] for m in other
    ]
    out, k = [], 0
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"] or [len(messages) - 1]
    for i, message in enumerate(messages):
        if i in targets:
            if kind == "mismatch":
                content = other_answers[k % len(other_answers)]
                k += 1
            else:
                content = corrupt_text(message["content"], "", kind, rng)
            message = {**message, "content": content}
        out.append(message)
    return out


def synthetic_negatives(items: list, kinds: list[str], ratio: float, seed: int, chat: bool) -> list:
    """``round(ratio * len(items))`` corrupted copies of ``items`` (texts or message lists), seeded.

    Corruption kinds cycle so every kind is represented; the partner row of ``mismatch`` is another row.
    """
    rng = random.Random(seed)
    n = round(ratio * len(items))
    out = []
    for i in range(n):
        j = rng.randrange(len(items))
        other = items[(j + 1 + rng.randrange(max(1, len(items) - 1))) % len(items)] if len(items) > 1 else items[j]
        kind = kinds[i % len(kinds)]
        if chat:
            out.append(corrupt_messages(items[j], other, kind, rng))
        else:
            out.append(corrupt_text(items[j], other, kind, rng))
    return out


# --------------------------------------------------------------------------------------------------
# Rows -> model inputs
# --------------------------------------------------------------------------------------------------

@dataclass
class LabelledRows:
    texts: list[str]
    quality: list[int]  # 1 good, 0 garbage
    n_dropped_empty: int = 0


def collect_rows(ds, source: str, tokenizer, *, text_field: str, messages_field: str | None,
                 label_field: str | None) -> tuple[list, list[int], int]:
    """``(items, labels, n_empty)``: raw texts or message lists with their validated labels.

    Empty or whitespace-only rows are skipped (and counted) because they carry no routing signal.
    """
    check_fields(ds, source, text_field=text_field, messages_field=messages_field, label_field=label_field)
    column = messages_field or text_field
    items, labels, empty = [], [], 0
    label_values = ds[label_field] if label_field else None
    for row, value in enumerate(ds[column]):
        label = parse_label(label_values[row], source, row, label_field) if label_field else 1
        if messages_field:
            messages = check_messages(value, source, row, column)
            if not any(m["content"].strip() for m in messages):
                empty += 1
                continue
            items.append(messages)
        else:
            if value is None or (isinstance(value, str) and not value.strip()):
                empty += 1
                continue
            if not isinstance(value, str):
                raise DataError(f"{source} row {row}: field '{column}' must be a string, got {type(value).__name__}.")
            items.append(value)
        labels.append(label)
    if not items:
        raise DataError(f"{source}: every row of field '{column}' is empty.")
    return items, labels, empty


def build_labelled_texts(items: list, labels: list[int], tokenizer, *, chat: bool,
                         synthetic_kinds: list[str] | None, synthetic_ratio: float, seed: int) -> LabelledRows:
    """Render rows to text and append synthetic negatives made from the good rows when asked."""
    if synthetic_kinds:
        good = [it for it, lab in zip(items, labels, strict=True) if lab == 1]
        if not good:
            raise DataError("--synthetic_negatives needs good rows (label 1) to corrupt, and there are none.")
        negatives = synthetic_negatives(good, synthetic_kinds, synthetic_ratio, seed, chat)
        items = list(items) + negatives
        labels = list(labels) + [0] * len(negatives)
    texts = [render_messages(tokenizer, it) if chat else it for it in items]
    return LabelledRows(texts, list(labels))


def tokenize_labelled(rows: LabelledRows, tokenizer, max_seq_length: int):
    """A ``datasets.Dataset`` with input_ids, attention_mask, labels (-100 on garbage rows) and quality."""
    import datasets

    enc = tokenizer(rows.texts, truncation=True, max_length=max_seq_length, add_special_tokens=True)
    labels = [ids if q == 1 else [-100] * len(ids) for ids, q in zip(enc["input_ids"], rows.quality, strict=True)]
    return datasets.Dataset.from_dict({
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
        "quality": rows.quality,
    })


@dataclass
class PadCollator:
    """Pads input_ids / attention_mask / labels to the longest row; scalar columns become tensors."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}
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


def _split_rows(items: list, labels: list[int], n_eval: int, seed: int):
    """Deterministically hold out ``n_eval`` of the rows."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held, kept = sorted(order[:n_eval]), sorted(order[n_eval:])
    return ([items[i] for i in kept], [labels[i] for i in kept]), ([items[i] for i in held], [labels[i] for i in held])


def prepare_router_datasets(data_args, tokenizer, *, seed: int, main_process_first=None):
    """Train (and optional eval) datasets for train_router.py, plus a summary of what went in.

    Synthetic negatives are made per split from that split's own good rows, so held-out garbage never
    derives from a training row. An eval split gets synthetic negatives only when it has no labelled garbage.
    """
    import contextlib

    chat = bool(data_args.messages_field)
    fields = dict(text_field=data_args.text_field, messages_field=data_args.messages_field,
                  label_field=data_args.label_field)
    guard = main_process_first or (lambda **_: contextlib.nullcontext())
    with guard(desc="loading data"):
        train_raw = load_rows(data_args.train_file, config_name=data_args.dataset_config_name)
        eval_raw = None
        if data_args.validation_file:
            eval_raw = load_rows(data_args.validation_file, split="validation",
                                 config_name=data_args.dataset_config_name)
    if data_args.max_train_samples:
        train_raw = train_raw.select(range(min(len(train_raw), data_args.max_train_samples)))
    items, labels, empty = collect_rows(train_raw, data_args.train_file, tokenizer, **fields)
    eval_items = eval_labels = None
    if eval_raw is not None:
        if data_args.max_eval_samples:
            eval_raw = eval_raw.select(range(min(len(eval_raw), data_args.max_eval_samples)))
        eval_items, eval_labels, _ = collect_rows(eval_raw, data_args.validation_file, tokenizer, **fields)
    elif data_args.validation_split_percentage > 0:
        n_eval = held_out_count(len(items), data_args.validation_split_percentage, data_args.train_file)
        (items, labels), (eval_items, eval_labels) = _split_rows(items, labels, n_eval, seed)

    kinds = data_args.kinds() if data_args.synthetic_negatives else None
    train_rows = build_labelled_texts(items, labels, tokenizer, chat=chat, synthetic_kinds=kinds,
                                      synthetic_ratio=data_args.synthetic_ratio, seed=seed)
    if 0 not in train_rows.quality:
        raise DataError(
            f"{data_args.train_file} has no garbage rows (label 0); add labelled garbage with --label_field "
            "or pass --synthetic_negatives."
        )
    if 1 not in train_rows.quality:
        raise DataError(f"{data_args.train_file} has no good rows (label 1); the LM and routing losses need some.")
    train_ds = tokenize_labelled(train_rows, tokenizer, data_args.max_seq_length)
    eval_ds = None
    summary = {"train_rows": len(train_rows.texts), "train_garbage": train_rows.quality.count(0),
               "train_empty_skipped": empty}
    if eval_items is not None:
        eval_kinds = kinds if kinds and 0 not in eval_labels else None
        eval_rows = build_labelled_texts(eval_items, eval_labels, tokenizer, chat=chat, synthetic_kinds=eval_kinds,
                                         synthetic_ratio=data_args.synthetic_ratio, seed=seed + 1)
        eval_ds = tokenize_labelled(eval_rows, tokenizer, data_args.max_seq_length)
        summary.update(eval_rows=len(eval_rows.texts), eval_garbage=eval_rows.quality.count(0))
    return train_ds, eval_ds, summary


# --------------------------------------------------------------------------------------------------
# Supervised fine-tuning rows: token ids plus which tokens the loss sees
# --------------------------------------------------------------------------------------------------

def _char_spans_to_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    return [int(any(a <= start < b for a, b in spans)) if end > start else 0 for start, end in offsets]


def chat_assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn marker included).

    Works with any chat template that renders a conversation's prefixes as prefixes of the whole (true of
    ChatML, Llama, Qwen, Mistral templates); it needs no ``{% generation %}`` markers in the template.
    """
    full = render_messages(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(
                "This tokenizer's chat template does not render a conversation's prefixes as prefixes of the whole, "
                "so assistant turns cannot be located; use prompt/completion rows instead."
            )
        spans.append((len(before), len(through)))
    return full, spans


def sft_example(row: dict, tokenizer, *, text_field: str, messages_field: str | None, prompt_field: str | None,
                completion_field: str | None, max_length: int, source: str, index: int) -> dict[str, list[int]]:
    """``input_ids`` and ``assistant_masks`` (1 where the loss applies) for one row of any supported shape.

    Chat rows: loss on assistant turns only. Prompt/completion rows: loss on the completion only. Text rows: loss
    everywhere. Text and completions end with the EOS token so the model learns to stop.
    """
    eos = tokenizer.eos_token or ""
    if messages_field:
        messages = check_messages(row.get(messages_field), source, index, messages_field)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{source} row {index}: field '{messages_field}' has no assistant turn to learn from.")
        text, spans = chat_assistant_spans(tokenizer, messages)
    elif prompt_field:
        prompt, completion = row.get(prompt_field), row.get(completion_field)
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise DataError(f"{source} row {index}: fields '{prompt_field}' and '{completion_field}' must be strings "
                            "and the completion must not be empty.")
        text = prompt + completion + eos
        spans = [(len(prompt), len(text))]
    else:
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source} row {index}: field '{text_field}' is empty or not text.")
        text = text + eos
        spans = [(0, len(text))]
    enc = tokenizer(text, add_special_tokens=not messages_field, return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    # Special tokens the tokenizer adds (empty offsets) are never targets.
    mask = _char_spans_to_token_mask(enc["offset_mapping"], spans)
    return {"input_ids": enc["input_ids"], "assistant_masks": mask}


def prepare_sft_datasets(data_args, tokenizer, *, max_length: int, seed: int, main_process_first=None):
    """Tokenised train (and optional eval) datasets for train_target.py: ``input_ids`` and ``assistant_masks``."""
    import contextlib

    guard = main_process_first or (lambda **_: contextlib.nullcontext())
    with guard(desc="loading data"):
        train = load_rows(data_args.train_file, config_name=data_args.dataset_config_name)
        evals = (load_rows(data_args.validation_file, split="validation", config_name=data_args.dataset_config_name)
                 if data_args.validation_file else None)
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evals is None and data_args.validation_split_percentage > 0:
        n_eval = held_out_count(len(train), data_args.validation_split_percentage, data_args.train_file)
        split = train.train_test_split(test_size=n_eval, seed=seed)
        train, evals = split["train"], split["test"]
    if evals is not None and data_args.max_eval_samples:
        evals = evals.select(range(min(len(evals), data_args.max_eval_samples)))

    def tokenize(ds, source: str):
        fields = [f for f in (data_args.messages_field, data_args.prompt_field,
                              data_args.completion_field if data_args.prompt_field else None) if f]
        fields = fields or [data_args.text_field]
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise DataError(f"{source} has no field '{missing[0]}' (fields: {', '.join(ds.column_names)}); set "
                            "--text_field, --messages_field or --prompt_field/--completion_field.")
        kwargs = dict(text_field=data_args.text_field, messages_field=data_args.messages_field,
                      prompt_field=data_args.prompt_field, completion_field=data_args.completion_field,
                      max_length=max_length, source=source)
        out = ds.map(lambda row, i: sft_example(row, tokenizer, index=i, **kwargs), with_indices=True,
                     remove_columns=ds.column_names, desc=f"tokenising {os.path.basename(source)}")
        # A row whose learnable part lies wholly beyond max_length teaches nothing; say so instead of training on it.
        kept = out.filter(lambda row: 1 in row["assistant_masks"])
        if len(kept) < len(out):
            logger.warning("%s: %d of %d rows have no trainable tokens within max_length=%d and are left out",
                           source, len(out) - len(kept), len(out), max_length)
        if len(kept) == 0:
            raise DataError(f"{source}: no row has trainable tokens within max_length={max_length}; raise --max_length.")
        return kept

    with guard(desc="tokenising"):
        train_ds = tokenize(train, data_args.train_file)
        eval_ds = tokenize(evals, data_args.validation_file or data_args.train_file) if evals is not None else None
    return train_ds, eval_ds


def load_tool_queries(source: str, tool_names: list[str], *, query_field: str = "query", tool_field: str = "tool",
                      kind_field: str = "kind") -> tuple[list[str], list[int], list[int]]:
    """``(queries, tool indices, resource flags)`` from rows of ``{"query", "tool", "kind"?}``.

    ``kind`` "resource" marks a query that only resource facts can settle ("the fastest ...", "fits in 4 GB");
    anything else, or no kind, is a semantic query.
    """
    ds = load_rows(source)
    for name in (query_field, tool_field):
        if name not in ds.column_names:
            raise DataError(f"{source} has no field '{name}' (fields: {', '.join(ds.column_names)}).")
    index = {name: i for i, name in enumerate(tool_names)}
    kinds = ds[kind_field] if kind_field in ds.column_names else [None] * len(ds)
    queries, tools, resource = [], [], []
    for row, (query, tool, kind) in enumerate(zip(ds[query_field], ds[tool_field], kinds, strict=True)):
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{source} row {row}: field '{query_field}' is empty.")
        if tool not in index:
            raise DataError(f"{source} row {row}: tool '{tool}' is not in the tools file; fix the name or add the tool.")
        queries.append(query.strip())
        tools.append(index[tool])
        resource.append(int(kind == "resource"))
    return queries, tools, resource
