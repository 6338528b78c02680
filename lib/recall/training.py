"""One training run of a recall model on a set of entries, and the rows it trains on (used by the final run and by
every cross-validation fold)."""

from __future__ import annotations

import random

import datasets
import torch

from lib.recall.data import RecallCollator, qa_row, recall_row, recited_answer, sft_row
from lib.recall.evaluation import UNKNOWN, holds_answer, normalise


def load_qa_rows(path: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Training questions: the same {user_id, question, answer} rows as evaluation probes."""
    from lib.recall.probes import load_probes

    return load_probes(path, limit, seed)


def qa_slots(questions: list[dict], hits: list[list[tuple[float, int]]], entries: list[dict], *, top_k: int,
             unanswerable_ratio: float = 0.0, seed: int = 0
             ) -> tuple[list[dict], list[list[int]], list[str | None]]:
    """The training questions, the entry rows each reads, and the entry text its answer recites.

    The rows are the retrieved ones, with the entry the answer comes from put in place of the last one when
    retrieval missed it, so the model learns to read the right memory rather than to guess or to refuse. That entry
    is the gold one (``memory`` equal to an entry text of the same user), else an entry of the user whose text holds
    the answer (extracted entries are worded otherwise than the gold text), a retrieved one first. It is the recited
    entry; None (nothing to recite: the answer is "I have no memory of that", then "unknown") when no entry of the
    user holds the answer.

    ``hits`` hold more than ``top_k`` rows per question. For ``unanswerable_ratio`` of the questions with a source
    entry (seeded), a copy of the question is added whose slots are the ``top_k`` nearest entries that do not hold
    the answer, answered "unknown": with only the contrast between these two rows can the model learn that a slot
    must answer the question before it answers from it."""
    rng = random.Random(seed)
    by_text = {(e["user_id"], normalise(e["text"])): i for i, e in enumerate(entries)}
    by_user: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_user.setdefault(str(e["user_id"]), []).append(i)
    kept, slots, recited = [], [], []
    for question, found in zip(questions, hits, strict=True):
        nearest = [r for _, r in found]
        rows = nearest[:top_k]
        user = str(question["user_id"])
        answer = str(question["answer"])

        def holds(r: int) -> bool:
            return holds_answer(entries[r]["text"], answer)
        source = by_text.get((user, normalise(question.get("memory") or "")))
        if source is None:
            source = next((r for r in rows + by_user.get(user, []) if holds(r)), None)
        if source is not None and source not in rows and rows:
            rows[-1] = source
        kept.append(question)
        slots.append(rows)
        recited.append(entries[source]["text"] if source is not None else None)
        if source is not None and rng.random() < unanswerable_ratio:
            others = [r for r in nearest if r != source and not holds(r)][:top_k]
            if others:
                kept.append({**question, "answer": UNKNOWN})
                slots.append(others)
                recited.append(None)
    return kept, slots, recited


def build_rows(tokenizer, entries: list[dict], entry_rows: list[int], questions: list[dict],
               slots: list[list[int]], recited: list[str | None], sft: list[list[dict]], *, sft_mix_ratio: float,
               max_length: int, slot: str, seed: int) -> datasets.Dataset:
    """Recall rows for ``entry_rows``, QA rows (recite, then answer) for questions with slots, and instruction rows
    at the mix ratio."""
    rows = [recall_row(tokenizer, i, entries[i]["text"], slot, max_length=max_length) for i in entry_rows]
    for question, memory_ids, memory in zip(questions, slots, recited, strict=True):
        if memory_ids:
            answer = str(question["answer"]) if memory is not None else UNKNOWN
            rows.append(qa_row(tokenizer, question["question"], recited_answer(memory, answer), memory_ids, slot,
                               max_length=max_length))
    if sft and sft_mix_ratio > 0:
        rng = random.Random(seed)
        want = round(len(rows) * sft_mix_ratio)
        for messages in (rng.choice(sft) for _ in range(want)):
            row = sft_row(tokenizer, messages, max_length=max_length)
            if row is not None:
                rows.append(row)
    return datasets.Dataset.from_list(rows)


def train_recall(model, tokenizer, train_ds, vectors: torch.Tensor, args, *, save_files=None, resume=None,
                 callbacks=(), sft_loss: str = "kl"):
    """Train ``model`` (a RecallModel) on ``train_ds``; returns the trainer."""
    from lib.recall.trainer import RecallTrainer

    trainer = RecallTrainer(model=model, args=args, train_dataset=train_ds,
                            data_collator=RecallCollator(vectors, tokenizer.pad_token_id), processing_class=tokenizer,
                            save_files=save_files, sft_loss=sft_loss)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer
