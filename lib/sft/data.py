"""Rows for supervised fine-tuning, shaped for TRL's SFTTrainer.

* Prompt/completion rows and plain-text rows go to TRL untokenised (columns ``prompt``/``completion``, or
  ``--dataset_text_field``), so TRL's own flags apply to them as documented: ``completion_only_loss``,
  ``eos_token``, ``max_length``, ``packing``.
* Chat rows are tokenised here with an ``assistant_masks`` column (loss on the assistant turns only), because
  TRL's ``assistant_only_loss`` needs ``{% generation %}`` markers in the chat template and cannot add them to
  every template (SmolLM2's, for one). The turns are located by rendering the conversation's prefixes, which works
  with any template that renders a conversation's prefixes as prefixes of the whole; that property is checked
  once per tokenizer.
"""

from __future__ import annotations

import logging
import os

from lib.core.data import check_messages, held_out_count, load_rows, render_messages
from lib.core.errors import DataError, UserError

logger = logging.getLogger(__name__)

_PROBE = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A sequence."},
    {"role": "user", "content": "And a tuple?"},
    {"role": "assistant", "content": "An immutable one."},
]


def check_prefix_rendering(tokenizer) -> None:
    """Refuse a chat template that does not render a conversation's prefixes as prefixes of the whole."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("Chat rows need a tokenizer with a chat template; this tokenizer has none (use "
                        "--prompt_field/--completion_field rows instead).")
    try:
        _assistant_spans(tokenizer, _PROBE)
    except DataError:
        raise DataError("This tokenizer's chat template does not render a conversation's prefixes as prefixes of the "
                        "whole, so assistant turns cannot be located; use prompt/completion rows instead.") from None


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = render_messages(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError("prefix rendering")
        spans.append((len(before), len(through)))
    return full, spans


def chat_example(messages: list[dict], tokenizer, *, max_length: int, source: str, index: int,
                 field: str) -> dict[str, list[int]]:
    """``input_ids`` and ``assistant_masks`` (1 on the assistant turns, end-of-turn marker included) of one chat row."""
    messages = check_messages(messages, source, index, field)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{source} row {index}: field '{field}' has no assistant turn to learn from.")
    try:
        text, spans = _assistant_spans(tokenizer, messages)
    except DataError:
        raise DataError(f"{source} row {index}: the chat template renders this conversation's prefixes differently "
                        "from the whole, so its assistant turns cannot be located; check the row's roles.") from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    mask = [int(any(a <= start < b for a, b in spans)) if end > start else 0 for start, end in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "assistant_masks": mask}


def check_trl_flags(data_args, args) -> None:
    """TRL's loss-mask flags that cannot apply to the rows given: one sentence, before any model loads."""
    chat, prompt = bool(data_args.messages_field), bool(data_args.prompt_field)
    if args.assistant_only_loss and not chat:
        raise UserError("--assistant_only_loss applies to chat rows (--messages_field); prompt/completion rows learn "
                        "the completion only already (--completion_only_loss), plain text rows learn every token.")
    if args.completion_only_loss and not prompt:
        raise UserError("--completion_only_loss applies to prompt/completion rows (--prompt_field, --completion_field)"
                        "; chat rows learn the assistant turns only already, plain text rows learn every token.")
    if chat:
        # Chat rows arrive with their assistant masks; TRL must not re-render them with a template of its own.
        args.assistant_only_loss = False


def _untokenised(ds, data_args, args, source: str):
    """Prompt/completion or text rows, validated and renamed to the columns TRL reads."""
    if data_args.prompt_field:
        names = {data_args.prompt_field: "prompt", data_args.completion_field: "completion"}
    else:
        names = {args.dataset_text_field: args.dataset_text_field}
    missing = [f for f in names if f not in ds.column_names]
    if missing:
        raise DataError(f"{source} has no field '{missing[0]}' (fields: {', '.join(ds.column_names)}); set "
                        "--dataset_text_field, --messages_field or --prompt_field/--completion_field.")
    for index, row in enumerate(ds.select_columns(list(names))):
        for field, value in row.items():
            if not isinstance(value, str) or (names[field] != "prompt" and not value.strip()):
                raise DataError(f"{source} row {index}: field '{field}' is empty or not text.")
    ds = ds.select_columns(list(names))
    renames = {old: new for old, new in names.items() if old != new}
    return ds.rename_columns(renames) if renames else ds


def _chat_tokenised(ds, data_args, args, tokenizer, source: str):
    field = data_args.messages_field
    if field not in ds.column_names:
        raise DataError(f"{source} has no field '{field}' (fields: {', '.join(ds.column_names)}); set "
                        "--messages_field, --dataset_text_field or --prompt_field/--completion_field.")
    max_length = args.max_length or 1024
    out = ds.map(lambda row, i: chat_example(row[field], tokenizer, max_length=max_length, source=source, index=i,
                                             field=field),
                 with_indices=True, remove_columns=ds.column_names, desc=f"tokenising {os.path.basename(source)}")
    # A row whose assistant turns lie wholly beyond max_length teaches nothing; say so instead of training on it.
    kept = out.filter(lambda row: 1 in row["assistant_masks"])
    if len(kept) < len(out):
        logger.warning("%s: %d of %d rows have no assistant tokens within max_length=%d and are left out",
                       source, len(out) - len(kept), len(out), max_length)
    if len(kept) == 0:
        raise DataError(f"{source}: no row has assistant tokens within max_length={max_length}; raise --max_length.")
    return kept


def prepare_sft_datasets(data_args, args, tokenizer):
    """Train (and optional eval) datasets for train_target.py, in the shapes described in the module docstring."""
    check_trl_flags(data_args, args)
    with args.main_process_first(desc="loading data"):
        train = load_rows(data_args.train_file, config_name=data_args.dataset_config_name)
        evals = (load_rows(data_args.validation_file, split="validation", config_name=data_args.dataset_config_name)
                 if data_args.validation_file else None)
    if data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evals is None and data_args.validation_split_percentage > 0:
        n_eval = held_out_count(len(train), data_args.validation_split_percentage, data_args.train_file)
        split = train.train_test_split(test_size=n_eval, seed=args.seed)
        train, evals = split["train"], split["test"]
    if evals is not None and data_args.max_eval_samples:
        evals = evals.select(range(min(len(evals), data_args.max_eval_samples)))
    if data_args.messages_field:
        check_prefix_rendering(tokenizer)

    def shape(ds, source: str):
        if data_args.messages_field:
            return _chat_tokenised(ds, data_args, args, tokenizer, source)
        return _untokenised(ds, data_args, args, source)

    with args.main_process_first(desc="tokenising"):
        train_ds = shape(train, data_args.train_file)
        eval_ds = shape(evals, data_args.validation_file or data_args.train_file) if evals is not None else None
    return train_ds, eval_ds
