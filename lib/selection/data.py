"""Rows for router training: labels, synthetic negatives, tokenisation, the held-out split."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import datasets

from lib.core.data import (
    assistant_spans,
    check_fields,
    encode_with_spans,
    check_messages,
    held_out_count,
    load_rows,
    parse_label,
    render_messages,
)
from lib.core.errors import DataError
from lib.selection.corruptions import synthetic_negatives
from lib.selection.rows import encode_texts

logger = logging.getLogger(__name__)


@dataclass
class LabelledRows:
    texts: list[str]
    quality: list[int]  # 1 good, 0 garbage
    n_dropped_empty: int = 0
    spans: list[list[tuple[int, int]]] | None = None  # character spans of the scored tokens (assistant turns)


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
                         synthetic_kinds: list[str] | None, synthetic_ratio: float, seed: int,
                         assistant_only: bool = False) -> LabelledRows:
    """Render rows to text and append synthetic negatives made from the good rows when asked; with
    ``assistant_only``, also the character spans of each chat's assistant turns."""
    if synthetic_kinds:
        good = [it for it, lab in zip(items, labels, strict=True) if lab == 1]
        if not good:
            raise DataError("--synthetic_negatives needs good rows (label 1) to corrupt, and there are none.")
        negatives = synthetic_negatives(good, synthetic_kinds, synthetic_ratio, seed, chat)
        items = list(items) + negatives
        labels = list(labels) + [0] * len(negatives)
    texts = [render_messages(tokenizer, it) if chat else it for it in items]
    spans = [assistant_spans(tokenizer, it, text) for it, text in zip(items, texts)] if assistant_only else None
    return LabelledRows(texts, list(labels), spans=spans)


def row_end_token(data_args, tokenizer) -> int | None:
    """The token appended to text rows (``--append_eos``), or None: chat rows end with their template's end-of-turn
    token already, and a tokenizer without an EOS token has nothing to append."""
    if not data_args.append_eos or data_args.messages_field:
        return None
    if tokenizer.eos_token_id is None:
        logger.warning("--append_eos: this tokenizer has no EOS token; text rows are read without an end marker.")
    return tokenizer.eos_token_id


def tokenize_labelled(rows: LabelledRows, tokenizer, max_seq_length: int, eos_id: int | None = None):
    """A ``datasets.Dataset`` with input_ids, attention_mask, labels (-100 on garbage rows) and quality; with spans,
    also ``score_mask`` (1 on the tokens the routing loss and the row score read), and rows whose scored tokens
    were all cut off by ``max_seq_length`` left out; ``eos_id`` is appended to text rows that fit (``encode_texts``).
    Returns ``(dataset, rows left out)``."""
    if rows.spans is None:
        ids, _ = encode_texts(tokenizer, rows.texts, max_seq_length, eos_id)
        masks = None
    else:
        ids, masks = encode_with_spans(tokenizer, rows.texts, rows.spans, max_seq_length)
    keep = [i for i in range(len(ids)) if masks is None or any(masks[i])]
    labels = [ids[i] if rows.quality[i] == 1 else [-100] * len(ids[i]) for i in keep]
    columns = {"input_ids": [ids[i] for i in keep], "attention_mask": [[1] * len(ids[i]) for i in keep],
               "labels": labels, "quality": [rows.quality[i] for i in keep]}
    if masks is not None:
        columns["score_mask"] = [masks[i] for i in keep]
    return datasets.Dataset.from_dict(columns), len(ids) - len(keep)


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
    assistant_only = data_args.score_tokens == "assistant"
    train_rows = build_labelled_texts(items, labels, tokenizer, chat=chat, synthetic_kinds=kinds,
                                      synthetic_ratio=data_args.synthetic_ratio, seed=seed,
                                      assistant_only=assistant_only)
    if 0 not in train_rows.quality:
        raise DataError(
            f"{data_args.train_file} has no garbage rows (label 0); add labelled garbage with --label_field "
            "or pass --synthetic_negatives."
        )
    if 1 not in train_rows.quality:
        raise DataError(f"{data_args.train_file} has no good rows (label 1); the LM and routing losses need some.")
    eos_id = row_end_token(data_args, tokenizer)
    train_ds, cut = tokenize_labelled(train_rows, tokenizer, data_args.max_seq_length, eos_id)
    eval_ds = None
    summary = {"train_rows": len(train_ds), "train_garbage": train_ds["quality"].count(0),
               "train_empty_skipped": empty}
    if assistant_only:
        summary["train_no_assistant_tokens_skipped"] = cut
    if eval_items is not None:
        eval_kinds = kinds if kinds and 0 not in eval_labels else None
        eval_rows = build_labelled_texts(eval_items, eval_labels, tokenizer, chat=chat, synthetic_kinds=eval_kinds,
                                         synthetic_ratio=data_args.synthetic_ratio, seed=seed + 1,
                                         assistant_only=assistant_only)
        eval_ds, cut = tokenize_labelled(eval_rows, tokenizer, data_args.max_seq_length, eos_id)
        summary.update(eval_rows=len(eval_ds), eval_garbage=eval_ds["quality"].count(0))
        if assistant_only:
            summary["eval_no_assistant_tokens_skipped"] = cut
    return train_ds, eval_ds, summary

