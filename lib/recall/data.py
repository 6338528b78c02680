"""Training and answer-time rows of the recall model: prompts with ``<recall>`` slots, labels on the answer only.

Three kinds of row, all in the model's chat format, memory slots always in the system message:
    recall  system "What you remember about the user: <recall>"       -> the entry text
            user "Repeat that memory word for word."
    qa      system "What you remember about the user: <recall> ..."   -> the answer (one slot per retrieved memory)
            user question
    sft     an ordinary instruction conversation (general ability kept), loss on the assistant turns
Rows name their memories by entry number (``memory_ids``); the collator puts the vectors in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.core.data import PadCollator

RECALL_PROMPT = "Repeat that memory word for word."
# Answers recite the memory they come from, then answer: reading a slot is then what reconstruction trains, and the
# answer is copied from the recited text (as recitation-augmented models do).
RECITED_ANSWER = "{memory}\nAnswer: {answer}"
NO_MEMORY = "I have no memory of that."
MEMORY_SYSTEM = "What you remember about the user: {memories}"
TASKS = {"recall": 0, "qa": 1, "sft": 2}


def as_user_question(question: str) -> str:
    """The question as it searches the index: memories speak of "the user", questions of "I" and "my"."""
    import re

    swaps = [(r"\bdo I\b", "does the user"), (r"\bam I\b", "is the user"), (r"\bI'm\b", "the user is"),
             (r"\bI\b", "the user"), (r"\bmy\b", "the user's"), (r"\bme\b", "the user"), (r"\bmine\b", "the user's")]
    for pattern, repl in swaps:
        question = re.sub(pattern, repl, question, flags=re.IGNORECASE)
    return question


def memory_messages(question: str, memories: list[str] | int | None, slot: str) -> list[dict]:
    """The chat of a question with memories: ``int`` k gives k ``<recall>`` slots, a list of texts pastes them in
    (the upper bound), ``None`` or 0 asks without memory."""
    messages = []
    if isinstance(memories, int) and memories > 0:
        messages.append({"role": "system", "content": MEMORY_SYSTEM.format(memories=" ".join([slot] * memories))})
    elif isinstance(memories, list) and memories:
        messages.append({"role": "system", "content": MEMORY_SYSTEM.format(memories=" ".join(memories))})
    messages.append({"role": "user", "content": question})
    return messages


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def supervised_row(tokenizer, messages: list[dict], answer: str, *, max_length: int) -> dict:
    """Prompt + answer + end of turn; labels only on the answer and the end of turn."""
    prompt = prompt_ids(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=False)
    if full[:len(prompt)] != prompt:  # a template that renders the prompt differently inside a whole chat
        full = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    full = full[:max_length]
    labels = [-100] * len(prompt) + full[len(prompt):]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels[:len(full)]}


def recall_messages(slot: str) -> list[dict]:
    return memory_messages(RECALL_PROMPT, 1, slot)


def recall_row(tokenizer, entry_id: int, text: str, slot: str, *, max_length: int = 128) -> dict:
    messages = recall_messages(slot)
    return {**supervised_row(tokenizer, messages, text, max_length=max_length), "memory_ids": [entry_id],
            "task": TASKS["recall"]}


def recited_answer(memory: str | None, answer: str) -> str:
    """The training target of a question: the memory it is answered from (or that there is none), then the answer."""
    return RECITED_ANSWER.format(memory=memory or NO_MEMORY, answer=answer)


def final_answer(generated: str) -> str:
    """The answer part of a recited answer (the whole text when it has none)."""
    marker = "Answer:"
    return generated.rsplit(marker, 1)[1].strip() if marker in generated else generated.strip()


def qa_row(tokenizer, question: str, answer: str, memory_ids: list[int], slot: str, *, max_length: int = 192) -> dict:
    messages = memory_messages(question, len(memory_ids), slot)
    return {**supervised_row(tokenizer, messages, answer, max_length=max_length), "memory_ids": list(memory_ids),
            "task": TASKS["qa"]}


def sft_row(tokenizer, messages: list[dict], *, max_length: int = 256) -> dict | None:
    """Loss on every assistant turn of an instruction conversation; None when nothing of an answer fits."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = prompt_ids(tokenizer, messages[:i])
        whole = tokenizer.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=False)
        if whole[:len(ids)] != ids or whole[:len(prompt)] != prompt:
            break
        labels += [-100] * (len(prompt) - len(ids)) + whole[len(prompt):]
        ids = whole
    ids, labels = ids[:max_length], labels[:max_length]
    if not any(label != -100 for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "memory_ids": [],
            "task": TASKS["sft"]}


@dataclass
class RecallCollator:
    """Pads the token columns and turns ``memory_ids`` into ``memory_vectors (batch, slots, dim)`` (zeros where a
    row has fewer slots) from ``vectors``, the table of every entry's vector."""

    vectors: torch.Tensor
    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [list(f["memory_ids"]) for f in features]
        batch = PadCollator(self.pad_token_id, self.padding_side)(
            [{k: v for k, v in f.items() if k != "memory_ids"} for f in features])
        slots = max(1, max(map(len, ids)))
        vectors = torch.zeros(len(features), slots, self.vectors.shape[1], dtype=self.vectors.dtype)
        for row, memory_ids in enumerate(ids):
            if memory_ids:
                vectors[row, :len(memory_ids)] = self.vectors[torch.as_tensor(memory_ids)]
        batch["memory_vectors"] = vectors
        return batch
