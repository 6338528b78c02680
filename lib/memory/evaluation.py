"""Measuring a memory model on QA rows: exact match, log-likelihood ranking, counterfactual following, gate hits.

Conditions (each a column of results.md):
    base           the frozen model alone (memory off)
    in_context     the frozen model with the gold entry's text pasted before the question (the upper bound)
    memory         the memory model with the given bank
    empty          the memory model with an empty bank (must equal base exactly)
    irrelevant     the memory model with a bank lacking the asked people (optional)
    counterfactual the memory model with the edited bank: how often the answer follows the edit (optional)
Rows ``{"question", "answer", "memory_id", "choices"?, "counterfactual_answer"?}``; ``choices`` enables
log-likelihood ranking (the answer must be among them).
"""

from __future__ import annotations

import re
import string

import torch

from lib.core.data import PadCollator, load_rows
from lib.core.errors import DataError
from lib.memory.bank import MemoryBank
from lib.memory.data import prompt_and_answer


def normalise(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return re.sub(r"\s+", " ", text).strip()


def load_qa(path: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    import random

    rows = load_rows(path)
    missing = {"question", "answer", "memory_id"} - set(rows.column_names)
    if missing:
        raise DataError(f"{path} lacks field(s) {sorted(missing)}; QA rows need question, answer and memory_id.")
    out = [dict(r) for r in rows]
    for n, row in enumerate(out):
        if row.get("choices") is not None and row["answer"] not in row["choices"]:
            raise DataError(f"{path} row {n}: the answer '{row['answer']}' is not among its choices; add it.")
    if limit is not None and limit < len(out):
        out = [out[i] for i in sorted(random.Random(seed).sample(range(len(out)), limit))]
    return out


def in_context_question(entry_text: str, question: str) -> str:
    return f"Fact: {entry_text}.\n{question}"


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers (left-padded batches; ``model`` is a MemoryModel or a plain causal LM)."""
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_and_answer(tokenizer, q, "x")[0] for q in questions[start:start + batch_size]]
        longest = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        for row in out[:, longest:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def choice_logprobs(model, tokenizer, questions: list[str], choices: list[list[str]], *,
                    batch_size: int) -> list[list[float]]:
    """Sum of the answer tokens' log-probabilities for every choice of every question.

    The prompt is the same for every choice, so it is read once: its KV cache (and a memory model's gate state) is
    copied for each choice and only the choices' tokens are read after it. ``batch_size`` counts choices."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    per_batch = max(1, batch_size // max(map(len, choices)))
    scores: list[list[float]] = []
    for start in range(0, len(questions), per_batch):
        pairs = [[prompt_and_answer(tokenizer, q, option) for option in options]
                 for q, options in zip(questions[start:start + per_batch], choices[start:start + per_batch])]
        prompts = [p[0][0] for p in pairs]  # the prompt does not depend on the answer
        batch = PadCollator(pad, padding_side="left")([{"input_ids": p, "attention_mask": [1] * len(p)}
                                                       for p in prompts])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                      logits_to_keep=1).logits[:, -1].float().log_softmax(-1)  # (B, V): the first answer token
        rows = torch.tensor([b for b, p in enumerate(pairs) for _ in p], device=device)
        cache.reorder_cache(rows)
        if hasattr(model, "reorder_cache_state"):
            model.reorder_cache_state(rows)
        answers = [a for p in pairs for _, a in p]
        batch = PadCollator(pad)([{"input_ids": a, "attention_mask": [1] * len(a)} for a in answers])
        answer_ids, answer_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        width = answer_ids.shape[1]
        logp = model(input_ids=answer_ids, attention_mask=torch.cat([mask[rows], answer_mask], 1),
                     position_ids=positions[rows, -1:] + 1 + torch.arange(width, device=device), cache=cache,
                     use_cache=True).logits.float().log_softmax(-1)  # (N, width, V): the tokens after the first
        n = 0
        for b, p in enumerate(pairs):
            scores.append([])
            for _, answer in p:
                total = first[b, answer[0]] + logp[n, :len(answer) - 1].gather(
                    -1, answer_ids[n, 1:len(answer), None]).sum()
                scores[-1].append(float(total))
                n += 1
    return scores


def score_condition(model, tokenizer, rows: list[dict], questions: list[str], *, max_new_tokens: int,
                    batch_size: int, target: str = "answer") -> dict:
    """Exact match / contains of greedy answers and log-likelihood ranking accuracy against ``row[target]``."""
    generated = generate_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
    exact = [normalise(g) == normalise(r[target]) for g, r in zip(generated, rows)]
    contains = [normalise(r[target]) in normalise(g) for g, r in zip(generated, rows)]
    out = {"exact_match": sum(exact) / len(rows), "contains": sum(contains) / len(rows), "answers": generated}
    if all(r.get("choices") for r in rows):
        lps = choice_logprobs(model, tokenizer, questions, [r["choices"] for r in rows], batch_size=batch_size * 4)
        picked = [r["choices"][max(range(len(lp)), key=lp.__getitem__)] for r, lp in zip(rows, lps)]
        out["ll_accuracy"] = sum(p == r[target] for p, r in zip(picked, rows)) / len(rows)
        out["ll_picked"] = picked
        out["logprobs"] = lps
    return out


@torch.no_grad()
def gate_hits(memory, tokenizer, rows: list[dict], bank: MemoryBank, batch_size: int) -> dict:
    """hit@1 / hit@k of the gate at the last prompt position (where the answer starts)."""
    device = next(memory.parameters()).device
    hits1 = hitsk = 0
    k = memory.memory_config.top_k
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [prompt_and_answer(tokenizer, r["question"], "x")[0] for r in chunk]
        longest = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([p + [pad] * (longest - len(p)) for p in prompts], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts], device=device)
        last = torch.zeros_like(mask, dtype=torch.bool)
        last[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in prompts])] = True
        top = memory.gate_forward(ids, mask, last)["entries"]  # (B, k), rows in order
        gold = torch.tensor([bank.index(r["memory_id"], "a QA row") for r in chunk], device=device)
        hits1 += int((top[:, 0] == gold).sum())
        hitsk += int((top == gold[:, None]).any(-1).sum())
    n = len(rows)
    side = int(memory.cell_entry.numel() ** 0.5)
    return {"hit@1": hits1 / n, f"hit@{k}": hitsk / n, "chance@1": 1 / len(bank), "grid": f"{side}x{side}"}


def evaluate_memory(memory, tokenizer, rows: list[dict], banks: dict[str, MemoryBank], *, max_new_tokens: int,
                    batch_size: int, progress=print) -> dict:
    """Every condition on ``rows``; ``banks`` holds "memory" and optionally "irrelevant" and "counterfactual"."""
    correct = banks["memory"]
    questions = [r["question"] for r in rows]
    results: dict[str, dict] = {}

    progress("base model (memory off)")
    with memory.memory_off():
        results["base"] = score_condition(memory, tokenizer, rows, questions, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)
        progress("base model with the gold entry in the prompt")
        texts = [correct.texts[correct.index(r["memory_id"], "a QA row")] for r in rows]
        results["in_context"] = score_condition(memory, tokenizer, rows,
                                                [in_context_question(t, q) for t, q in zip(texts, questions)],
                                                max_new_tokens=max_new_tokens, batch_size=batch_size)
    plan = [("memory", correct), ("empty", MemoryBank.from_texts([], tokenizer,
                                                                 max_entry_tokens=correct.max_entry_tokens))]
    plan += [(name, banks[name]) for name in ("irrelevant", "counterfactual") if name in banks]
    for name, bank in plan:
        progress(f"memory model, {name} bank ({len(bank)} entries)")
        memory.set_bank(bank)
        target = "counterfactual_answer" if name == "counterfactual" else "answer"
        results[name] = score_condition(memory, tokenizer, rows, questions, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, target=target)
        if name == "memory":
            results["gate"] = gate_hits(memory, tokenizer, rows, bank, batch_size)
    memory.set_bank(correct)
    base, empty = results["base"], results["empty"]
    results["empty_equals_base"] = (base["answers"] == empty["answers"]
                                    and base.get("logprobs") == empty.get("logprobs"))
    return results


def results_markdown(results: dict, n: int, qa_file: str) -> str:
    columns = [c for c in ("base", "in_context", "memory", "empty", "irrelevant", "counterfactual") if c in results]
    lines = [f"QA rows: {n} from `{qa_file}`. counterfactual: how often the answer follows the edited entry.", "",
             "| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for metric in ("exact_match", "contains", "ll_accuracy"):
        if any(metric in results[c] for c in columns):
            cells = [f"{results[c][metric]:.3f}" if metric in results[c] else "–" for c in columns]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    gate = results.get("gate")
    if gate:
        hits = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in gate.items())
        lines += ["", f"gate (memory bank): {hits}"]
    lines.append(f"empty bank equals base exactly: {results['empty_equals_base']}")
    return "\n".join(lines) + "\n"
