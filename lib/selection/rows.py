"""A pool's rows as token sequences to score: validated (bad rows get a reason, not an error), rendered with the
chat template, truncated and flagged; for IFD, each answer with and without its question."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lib.core.data import assistant_spans, encode_with_spans, is_message_list, render_messages


@dataclass
class Item:
    """One sequence to run: token ids and which tokens count as targets (for perplexity-style losses)."""

    ids: list[int]
    targets: list[int] | None = None


@dataclass
class PreparedRow:
    main: Item | None  # the row as text (router scores, perplexity) or question+answer (ifd)
    alone: Item | None = None  # ifd: the answer without its question
    truncated: bool = False
    skip_reason: str | None = None


def encode_texts(tokenizer, texts: list[str], max_len: int, eos_id: int | None = None
                 ) -> tuple[list[list[int]], list[bool]]:
    """Token ids of ``texts`` cut at ``max_len``, and whether each was cut. With ``eos_id``, a row that fits gets
    that end-of-sequence token appended (unless the tokenizer already ends it so): a causal model's last position
    then reads the whole row, so a row that stops early differs from the beginning of a longer one. A row that fills
    the window gets no end token, since its end is not in view."""
    # One token past the limit tells truncated rows apart from rows of exactly max_len tokens.
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len + 1)["input_ids"]
    cut = [len(ids) > max_len for ids in enc]
    if eos_id is not None:
        enc = [ids + [eos_id] if not c and (not ids or ids[-1] != eos_id) else ids for ids, c in zip(enc, cut)]
    return [ids[:max_len] for ids in enc], cut


def _skip_reason_text(value: Any) -> str | None:
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    return None if value.strip() else "empty"


def _skip_reason_messages(value: Any) -> str | None:
    if value is None:
        return "missing"

    if not is_message_list(value):
        return "not a list of {role, content} messages"
    return None if any(m["content"].strip() for m in value) else "empty"


def _skip_reasons(values: list, chat: bool) -> list[str | None]:
    return [(_skip_reason_messages if chat else _skip_reason_text)(v) for v in values]


def row_texts(values: list, tokenizer, *, chat: bool) -> tuple[list[str | None], list[str | None]]:
    """Each row as the text the scores read (chat rows through the chat template), or None with a skip reason."""
    reasons = _skip_reasons(values, chat)
    texts = [None if r is not None else render_messages(tokenizer, v) if chat else v
             for v, r in zip(values, reasons, strict=True)]
    return texts, reasons


def prepare_rows(values: list, tokenizer, *, chat: bool, max_len: int, ifd: bool,
                 assistant_only: bool = False, eos_id: int | None = None) -> list[PreparedRow]:
    """Validate, render and tokenise one shard's rows. Bad rows get a ``skip_reason`` instead of an error.
    With ``assistant_only`` (chat rows), each row's targets are its assistant turns' tokens; ``eos_id`` (text rows
    of routers trained with it) is appended to each row that fits, as ``encode_texts`` does, and is no target."""
    if ifd:
        return [PreparedRow(None, skip_reason=r) if r is not None else _prepare_ifd(v, tokenizer, max_len)
                for v, r in zip(values, _skip_reasons(values, chat), strict=True)]
    texts, reasons = row_texts(values, tokenizer, chat=chat)
    rows = [PreparedRow(None, skip_reason=r) for r in reasons]
    live = [i for i, text in enumerate(texts) if text is not None]
    if not live:
        return rows
    if assistant_only:
        spans = [assistant_spans(tokenizer, values[i], texts[i]) for i in live]
        ids, masks = encode_with_spans(tokenizer, [texts[i] for i in live], spans, max_len + 1)
        for i, row_ids, mask in zip(live, ids, masks, strict=True):
            cut = len(row_ids) > max_len
            row_ids, mask = row_ids[:max_len], mask[:max_len]
            rows[i] = (PreparedRow(Item(row_ids, mask), truncated=cut) if any(mask) else
                       PreparedRow(None, truncated=cut, skip_reason="no assistant tokens" + (
                           " within max_seq_length" if cut else "")))
        return rows
    ids, truncated = encode_texts(tokenizer, [texts[i] for i in live], max_len, eos_id)
    for i, row_ids, cut in zip(live, ids, truncated, strict=True):
        # The end token is read by the routers but is no target of perplexity: that stays the row's own.
        ended = eos_id is not None and not cut and row_ids[-1] == eos_id
        rows[i] = PreparedRow(Item(row_ids, [1] * (len(row_ids) - 1) + [0] if ended else None), truncated=cut)
    return rows


def _prepare_ifd(messages: list[dict], tokenizer, max_len: int) -> PreparedRow:
    """Question = every turn before the last assistant turn (with the generation prompt); answer = that turn."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return PreparedRow(None, skip_reason="no assistant turn")
    if last == 0:
        return PreparedRow(None, skip_reason="no question before the answer")
    answer = tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"]
    if not answer:
        return PreparedRow(None, skip_reason="empty answer")
    prompt_text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if len(prompt) >= max_len:
        return PreparedRow(None, truncated=True, skip_reason="question longer than max_seq_length")
    conditioned = (prompt + answer)[:max_len]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    alone = (bos + answer)[:max_len]
    truncated = len(prompt) + len(answer) > max_len or len(bos) + len(answer) > max_len
    main = Item(conditioned, [0] * len(prompt) + [1] * (len(conditioned) - len(prompt)))
    # Without a BOS token the first answer token has nothing to be predicted from.
    return PreparedRow(main, Item(alone, [0] * len(bos) + [1] * (len(alone) - len(bos))), truncated=truncated)

