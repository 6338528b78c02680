"""Measurements of a recall model: reconstruction of entries from their vectors (with controls that must
collapse), answers with recall vs no memory vs the memory text in the prompt, and index recall@k."""

from __future__ import annotations

import re
import string

import torch

from lib.core.data import PadCollator
from lib.recall.data import memory_messages, prompt_ids, recall_messages, recall_row
from lib.recall.trainer import token_losses

UNKNOWN = "unknown"


def normalise(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\s+", " ", text).strip()


def holds_answer(text: str, answer: str, gold: str = "") -> bool:
    """A memory entry's ``text`` is the ``gold`` memory text or names the ``answer`` as a whole word (normalised)."""
    text, answer = normalise(text), normalise(answer)
    return (bool(gold) and text == normalise(gold)) or (bool(answer) and f" {answer} " in f" {text} ")


def answer_correct(generated: str, answer: str) -> bool:
    """The gold answer is in the generated one's answer part (after "Answer:" when the model recites a memory
    first; normalised); "unknown" also accepts "don't know" / "not know"."""
    from lib.recall.data import final_answer

    said = normalise(final_answer(generated))
    if normalise(answer) == UNKNOWN:
        return UNKNOWN in said or "dont know" in said or "not know" in said
    return bool(normalise(answer)) and f" {normalise(answer)} " in f" {said} "


@torch.no_grad()
def generate_with_memories(model, tokenizer, prompts: list[list[int]], vectors: list[torch.Tensor], *,
                           max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers of the recall model; ``vectors[i]`` holds prompt i's slot vectors ``(slots, dim)``."""
    device = next(model.parameters()).device
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        batch = collate([{"input_ids": prompts[i], "attention_mask": [1] * len(prompts[i])} for i in chunk])
        slots = max(1, max(len(vectors[i]) for i in chunk))
        memory = torch.zeros(len(chunk), slots, model.recall_config.vector_dim)
        for row, i in enumerate(chunk):
            if len(vectors[i]):
                memory[row, :len(vectors[i])] = vectors[i]
        generated = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   memory.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated]
    return out


@torch.no_grad()
def reconstruction(model, tokenizer, texts: list[str], vectors: torch.Tensor, *, max_new_tokens: int = 32,
                   batch_size: int = 16, controls: bool = True, seed: int = 0) -> dict:
    """Exact match (normalised) and teacher-forced token accuracy of writing each entry out from its vector; with
    ``controls``, exact match from a zero vector, another entry's vector (shuffled) and a random vector of the same
    norm, each scored against the entry's own text."""
    slot = model.recall_config.recall_token
    prompt = prompt_ids(tokenizer, recall_messages(slot))
    device = next(model.parameters()).device

    def exact(vecs):
        written = generate_with_memories(model, tokenizer, [prompt] * len(texts), [v[None] for v in vecs],
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)
        return sum(normalise(w) == normalise(t) for w, t in zip(written, texts)) / max(1, len(texts)), written

    em, written = exact(vectors)
    correct = total = 0
    collate = PadCollator(tokenizer.pad_token_id)
    for start in range(0, len(texts), batch_size):
        rows = [recall_row(tokenizer, 0, t, slot) for t in texts[start:start + batch_size]]
        batch = collate([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       vectors[start:start + batch_size, None].to(device), use_cache=False).logits
        _, mask = token_losses(logits, batch["labels"].to(device))
        predicted = logits[:, :-1].argmax(-1)
        correct += int(((predicted == batch["labels"][:, 1:].to(device)) & mask).sum())
        total += int(mask.sum())
    result = {"entries": len(texts), "exact_match": em, "token_accuracy": correct / max(1, total),
              "examples": [{"entry": t, "written": w} for t, w in list(zip(texts, written))[:5]]}
    if controls and len(texts):
        g = torch.Generator().manual_seed(seed)
        shuffled = vectors[torch.roll(torch.arange(len(texts)), 1)] if len(texts) > 1 else torch.zeros_like(vectors)
        noise = torch.randn(vectors.shape, generator=g)
        noise = noise / noise.norm(dim=1, keepdim=True) * vectors.norm(dim=1, keepdim=True)
        result["controls"] = {name: exact(v)[0] for name, v in
                              (("zero", torch.zeros_like(vectors)), ("shuffled", shuffled), ("random", noise))}
    return result


def ask_prompts(tokenizer, questions: list[str], memories: list[list[str]] | list[int] | None, slot: str
                ) -> list[list[int]]:
    """Prompts for each question: with k slots (ints), with memory texts (lists of str), or without memory."""
    memories = memories if memories is not None else [None] * len(questions)
    return [prompt_ids(tokenizer, memory_messages(q, m, slot)) for q, m in zip(questions, memories)]
