"""Training rows for the memory stages: question/answer or chat rows, tokenised with the loss on the answer only.

A row is either ``{"question", "answer", "memory_id"?}`` or ``{"messages": [...], "memory_id"?}`` (the loss then
covers every assistant turn). ``memory_id`` names the bank entry that holds the answer; rows without one are
general rows (stage 4 mixes them in so general ability is kept) or, for gate training, rows the soft teacher labels.
"""

from __future__ import annotations

import random

import datasets

from lib.core.data import check_messages, load_rows
from lib.core.errors import DataError
from lib.memory.bank import MemoryBank

NO_MEMORY = -1


def prompt_and_answer(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (the question as a user turn, ready for the answer) and of the answer (with the
    end-of-turn tokens the chat template puts after it, so generation learns to stop)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise DataError("This tokenizer's chat template does not render a conversation as its prompt plus the "
                            "answer; use a model whose template does (most do).")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation: the loss covers every assistant turn."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        new_prompt = prompt_ids[len(ids):]
        answer = full_ids[len(prompt_ids):]
        ids = ids + new_prompt + answer
        labels = labels + [-100] * len(new_prompt) + answer
    return ids, labels


def load_memory_rows(path: str, tokenizer, bank: MemoryBank | None, *, max_length: int, require_memory_id: bool,
                     limit: int | None = None, seed: int = 0) -> datasets.Dataset:
    """Tokenised rows ``{input_ids, attention_mask, labels, memory_index}`` (``memory_index`` -1: none)."""
    rows = load_rows(path)
    columns = set(rows.column_names)
    if not ({"question", "answer"} <= columns or "messages" in columns):
        raise DataError(f"{path} has fields {sorted(columns)}; memory training rows need 'question' and 'answer' "
                        "(plus 'memory_id'), or chat 'messages'.")
    if require_memory_id and "memory_id" not in columns:
        raise DataError(f"{path} has no 'memory_id' field; this stage needs each row's gold bank entry "
                        "(or use --retrieval gate).")
    order = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        order = sorted(random.Random(seed).sample(order, limit))
    out = {"input_ids": [], "attention_mask": [], "labels": [], "memory_index": []}
    for n in order:
        row = rows[n]
        where = f"{path} row {n}"
        if "messages" in columns and row.get("messages") is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(f"{where} is a chat row, but the tokenizer has no chat template; use question/answer "
                                "rows or a chat model.")
            ids, labels = chat_example(tokenizer, check_messages(row["messages"], path, n, "messages"))
        else:
            question, answer = row.get("question"), row.get("answer")
            if not isinstance(question, str) or not isinstance(answer, str) or not question or not answer:
                raise DataError(f"{where} needs a non-empty string 'question' and 'answer'.")
            prompt, answer_ids = prompt_and_answer(tokenizer, question, answer)
            ids, labels = prompt + answer_ids, [-100] * len(prompt) + answer_ids
        if len(ids) > max_length:
            raise DataError(f"{where} has {len(ids)} tokens, more than --max_length {max_length}; shorten it or raise "
                            "the limit.")
        if all(label == -100 for label in labels):
            raise DataError(f"{where} has no answer tokens to learn from.")
        memory_id = row.get("memory_id")
        if memory_id in (None, ""):
            if require_memory_id:
                raise DataError(f"{where} has no memory_id; this stage needs each row's gold bank entry.")
            index = NO_MEMORY
        else:
            index = bank.index(str(memory_id), where) if bank is not None else NO_MEMORY
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["memory_index"].append(index)
    if not out["input_ids"]:
        raise DataError(f"{path} has no rows.")
    return datasets.Dataset.from_dict(out)


def mix_general(memory_rows: datasets.Dataset, general_rows: datasets.Dataset, ratio: float,
                seed: int) -> datasets.Dataset:
    """Memory rows plus general rows such that general rows are ``ratio`` of the result (sampled with a seed)."""
    if ratio <= 0:
        return memory_rows
    wanted = round(len(memory_rows) * ratio / (1 - ratio))
    rng = random.Random(seed)
    picks = [rng.randrange(len(general_rows)) for _ in range(wanted)] if wanted > len(general_rows) else \
        rng.sample(range(len(general_rows)), wanted)
    mixed = datasets.concatenate_datasets([memory_rows, general_rows.select(picks)])
    return mixed.shuffle(seed=seed)
