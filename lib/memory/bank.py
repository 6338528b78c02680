"""The memory bank: N short text entries a person can read, edit, add or delete, held as token ids plus text.

A bank file is JSON lines (or any format ``datasets`` reads) with a ``text`` field and an optional ``id``; it is
saved with every run as ``memory_bank.jsonl`` and can be swapped at evaluation time. Entries longer than
``max_entry_tokens`` are refused with their id (or cut with ``truncate=True``). The bank's fingerprint (a digest of
its ids and texts) keys every cache computed from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from lib.core.data import load_rows
from lib.core.errors import DataError
from lib.core.files import atomic_path

BANK_FILE = "memory_bank.jsonl"


def entry_tokens(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of entries as they read inside a sentence, where questions name them.

    Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM) mark a word's leading space, so a name at the start of a text
    gets other tokens than the same name inside a question ("Pala Bitu was ..." starts "P ala", "does Pala Bitu"
    has " Pal a"), and the gate could match only the surname. For such tokenizers entries are read after a space;
    tokenizers that add a word-start marker themselves (SentencePiece) read them as they are."""
    if not texts:
        return []

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    inside, spaced, alone = encode("a name"), encode(" name"), encode("name")
    prefix = " " if inside[-len(spaced):] == spaced and inside[-len(alone):] != alone else ""
    return tokenizer([prefix + text for text in texts], add_special_tokens=False)["input_ids"]


@dataclass
class MemoryBank:
    """Entries as ids, texts and right-padded token ids ``(N, L)`` with a mask; N may be 0 (the empty bank)."""

    ids: list[str]
    texts: list[str]
    input_ids: torch.Tensor  # (N, L) long, right-padded
    attention_mask: torch.Tensor  # (N, L) long
    source: str = ""
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {entry_id: i for i, entry_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_entry_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def index(self, entry_id: str, where: str = "") -> int:
        """Position of ``entry_id``; an unknown id is one sentence naming where it came from."""
        try:
            return self._index[str(entry_id)]
        except KeyError:
            raise DataError(f"{where or 'a row'} names memory_id '{entry_id}', which is not in the bank "
                            f"{self.source or ''} ({len(self)} entries); fix the id or add the entry.") from None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for entry_id, text in zip(self.ids, self.texts):
            digest.update(json.dumps([entry_id, text], ensure_ascii=False).encode())
        digest.update(str(self.max_entry_tokens).encode())
        digest.update(self.input_ids.numpy().tobytes())  # the tokenisation too: caches hold what the model read
        return digest.hexdigest()[:16]

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, *, ids: list[str] | None = None, max_entry_tokens: int = 16,
                   truncate: bool = False, source: str = "") -> MemoryBank:
        ids = [str(i) for i in (ids if ids is not None else range(len(texts)))]
        where = source or "the memory bank"
        seen: dict[str, int] = {}
        for row, (entry_id, text) in enumerate(zip(ids, texts)):
            if entry_id in seen:
                raise DataError(f"{where} row {row}: id '{entry_id}' is already used by row {seen[entry_id]}; ids "
                                "must be unique.")
            seen[entry_id] = row
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where} row {row} (id '{entry_id}') has no text; every entry needs a non-empty "
                                "'text'.")
        encoded = entry_tokens(tokenizer, list(texts))
        for row, (entry_id, tokens) in enumerate(zip(ids, encoded)):
            if len(tokens) > max_entry_tokens and not truncate:
                raise DataError(f"{where} row {row} (id '{entry_id}') has {len(tokens)} tokens, more than "
                                f"--max_entry_tokens {max_entry_tokens}; shorten or split the entry, raise the limit, "
                                "or pass --truncate_entries.")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(texts), max_entry_tokens), pad, dtype=torch.long)
        mask = torch.zeros((len(texts), max_entry_tokens), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            tokens = tokens[:max_entry_tokens]
            input_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return cls(ids, list(texts), input_ids, mask, source=source)

    @classmethod
    def load(cls, path: str, tokenizer, *, max_entry_tokens: int = 16, truncate: bool = False,
             allow_empty: bool = False) -> MemoryBank:
        """Read a bank file (rows ``{"id"?, "text"}``) or a run folder holding ``memory_bank.jsonl``."""
        if os.path.isdir(path) and os.path.exists(os.path.join(path, BANK_FILE)):
            path = os.path.join(path, BANK_FILE)
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            if allow_empty:
                return cls.from_texts([], tokenizer, max_entry_tokens=max_entry_tokens, source=path)
            raise DataError(f"The memory bank {path} has no entries; give it at least one row "
                            '{"id": ..., "text": ...}.')
        rows = load_rows(path)
        if "text" not in rows.column_names:
            raise DataError(f"The memory bank {path} has no field 'text' (fields: {', '.join(rows.column_names)}); "
                            'each row needs {"id": ..., "text": ...} (id optional).')
        ids = [str(i) for i in rows["id"]] if "id" in rows.column_names else None
        return cls.from_texts(rows["text"], tokenizer, ids=ids, max_entry_tokens=max_entry_tokens, truncate=truncate,
                              source=path)

    def save(self, output_dir: str) -> str:
        """Write ``memory_bank.jsonl`` (ids and texts, the form a person edits) atomically; return its path."""
        path = os.path.join(output_dir, BANK_FILE)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": entry_id, "text": text}, ensure_ascii=False) + "\n"
                         for entry_id, text in zip(self.ids, self.texts))
        return path
