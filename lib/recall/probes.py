"""Questions about users' memories, answered four ways: with recall (one ``<recall>`` slot per retrieved memory),
without memory (the recall model, and the base model), with the retrieved memories' text in the prompt (the same
memories as recall, as text: what one token per memory costs), and with the gold memory text in the prompt (the
upper bound). The last three by the base model and by the recall model. Plus index recall@k and the context tokens
each way uses.

Probe rows: ``{"user_id", "question", "answer"}``, optional ``"memory"`` (the gold memory text) and ``"kind"``
(results are also split by it). An answer is right when the gold answer appears in it (normalised); "unknown" also
accepts "don't know".
"""

from __future__ import annotations

import contextlib

from lib.core.data import load_rows
from lib.core.errors import DataError
from lib.recall.evaluation import (
    answer_correct,
    ask_prompts,
    generate_with_memories,
    holds_answer,
    normalise,
)


def load_probes(path: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    import random

    rows = load_rows(path)
    missing = {"user_id", "question", "answer"} - set(rows.column_names)
    if missing:
        raise DataError(f"{path} lacks field(s) {sorted(missing)}; probe rows need user_id, question and answer.")
    out = [dict(r) for r in rows]
    if limit is not None and limit < len(out):
        out = [out[i] for i in sorted(random.Random(seed).sample(range(len(out)), limit))]
    return out


def evaluate_probes(assistant, probes: list[dict], *, max_new_tokens: int = 16, batch_size: int = 16,
                    progress=None) -> dict:
    """Accuracy per condition (and per kind), index recall@1 / @k, mean prompt tokens per condition."""
    import torch

    model, tokenizer = assistant.model, assistant.tokenizer
    slot = model.recall_config.recall_token
    questions = [p["question"] for p in probes]
    users = [str(p["user_id"]) for p in probes]
    say = progress or (lambda message: None)
    hits = assistant.retrieve(questions, users)
    conditions: dict[str, tuple[list[list[int]], list, contextlib.AbstractContextManager]] = {}
    vectors = [torch.from_numpy(assistant.index.vectors([row for _, row in h])) for h in hits]
    conditions["recall"] = (ask_prompts(tokenizer, questions, [len(h) for h in hits], slot), vectors,
                            contextlib.nullcontext)
    empty = [torch.zeros(0, model.recall_config.vector_dim)] * len(probes)
    conditions["no_memory"] = (ask_prompts(tokenizer, questions, None, slot), empty, contextlib.nullcontext)
    conditions["base_no_memory"] = (conditions["no_memory"][0], empty, model.model.disable_adapter)
    retrieved_texts = [[assistant.index.entries[row]["text"] for _, row in h] for h in hits]
    prompts = ask_prompts(tokenizer, questions, retrieved_texts, slot)
    conditions["retrieved_text"] = (prompts, empty, contextlib.nullcontext)
    conditions["base_retrieved_text"] = (prompts, empty, model.model.disable_adapter)
    with_text = [i for i, p in enumerate(probes) if p.get("memory")]
    if with_text:
        texts = [[probes[i]["memory"]] for i in with_text]
        prompts = ask_prompts(tokenizer, [questions[i] for i in with_text], texts, slot)
        conditions["gold_text"] = (prompts, [empty[0]] * len(with_text), contextlib.nullcontext)
        conditions["base_gold_text"] = (prompts, [empty[0]] * len(with_text), model.model.disable_adapter)
    answers: dict[str, list[str]] = {}
    for name, (prompts, vecs, context) in conditions.items():
        say(f"answering {len(prompts)} questions: {name}")
        with context():
            answers[name] = generate_with_memories(model, tokenizer, prompts, vecs, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size)
    rows_of = {name: (with_text if "gold_text" in name else list(range(len(probes)))) for name in conditions}
    kinds = sorted({str(p.get("kind")) for p in probes if p.get("kind") is not None})
    results: dict = {"probes": len(probes), "top_k": assistant.top_k, "conditions": {}}
    correct: dict[str, list[bool]] = {}
    for name, rows in rows_of.items():
        right = correct[name] = [answer_correct(a, str(probes[i]["answer"])) for i, a in zip(rows, answers[name])]
        entry = {"accuracy": sum(right) / max(1, len(right)), "rows": len(rows),
                 "prompt_tokens": sum(map(len, conditions[name][0])) / max(1, len(rows)),
                 "memory_tokens": (sum(len(hits[i]) for i in rows) / max(1, len(rows)) if name == "recall" else
                                   None)}
        for kind in kinds:
            mine = [r for r, i in zip(right, rows) if str(probes[i].get("kind")) == kind]
            if mine:
                entry[f"accuracy_{kind}"] = sum(mine) / len(mine)
        results["conditions"][name] = entry
    if with_text:
        paste = [len(tokenizer(probes[i]["memory"], add_special_tokens=False)["input_ids"]) for i in with_text]
        for name in ("gold_text", "base_gold_text"):
            results["conditions"][name]["memory_tokens"] = sum(paste) / len(paste)
    paste = [sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) for texts in retrieved_texts]
    for name in ("retrieved_text", "base_retrieved_text"):
        results["conditions"][name]["memory_tokens"] = sum(paste) / max(1, len(paste))
    # Index recall@k: a retrieved entry holds the gold memory text, or (entries written by an extractor) the answer.
    known = [i for i, p in enumerate(probes) if normalise(str(p["answer"])) != "unknown"]

    def retrieved(i: int, k: int) -> bool:
        return any(holds_answer(assistant.index.entries[row]["text"], str(probes[i]["answer"]),
                                probes[i].get("memory") or "") for _, row in hits[i][:k])

    for k in sorted({1, assistant.top_k}):
        results[f"index_recall@{k}"] = sum(retrieved(i, k) for i in known) / max(1, len(known))
    # Reading apart from retrieval: accuracy on the questions whose memory was among the retrieved ones, beside the
    # gold text in the prompt on the same questions.
    found = [i for i in known if retrieved(i, assistant.top_k)]
    position = {i: n for n, i in enumerate(with_text)}
    results["when_retrieved"] = {
        "rows": len(found),
        **{name: sum(correct[name][i] for i in found) / max(1, len(found))
           for name in ("recall", "retrieved_text", "base_retrieved_text")},
        "base_gold_text": (sum(correct["base_gold_text"][position[i]] for i in found if i in position)
                           / max(1, sum(i in position for i in found))
                           if with_text else None)}
    # The upper bound is only asked the questions that have a gold memory: recall on those same questions beside it,
    # and the retrieved memories' text on them (the same memories as recall, in the prompt).
    if with_text:
        results["answerable"] = {name: sum(correct[name][i] for i in with_text) / len(with_text)
                                 for name in ("recall", "retrieved_text", "base_retrieved_text")}
        results["answerable"]["rows"] = len(with_text)
    results["examples"] = [{"user_id": users[i], "question": questions[i], "answer": probes[i]["answer"],
                            "recall": answers["recall"][i], "memories": [assistant.index.entries[r]["text"]
                                                                         for _, r in hits[i]]}
                           for i in range(min(5, len(probes)))]
    return results


def probes_markdown(results: dict, source: str) -> str:
    names = {"recall": "recall model, one <recall> slot per retrieved memory",
             "no_memory": "recall model, no memory", "base_no_memory": "base model, no memory",
             "retrieved_text": "recall model, the retrieved memories' text in the prompt",
             "base_retrieved_text": "base model, the retrieved memories' text in the prompt",
             "gold_text": "recall model, gold memory text in the prompt",
             "base_gold_text": "base model, gold memory text in the prompt"}
    kinds = sorted({k[len("accuracy_"):] for c in results["conditions"].values() for k in c if
                    k.startswith("accuracy_")})
    lines = [f"Recall-memory probes: {results['probes']} questions from `{source}` (top_k {results['top_k']})", "",
             "| condition | accuracy | " + " | ".join(kinds) + (" | " if kinds else "") + "memory tokens | "
             "prompt tokens |",
             "|---|---|" + "---|" * len(kinds) + "---|---|"]
    for name, c in results["conditions"].items():
        per_kind = " | ".join(f"{c[f'accuracy_{k}']:.3f}" if f"accuracy_{k}" in c else "" for k in kinds)
        memory = f"{c['memory_tokens']:.1f}" if c.get("memory_tokens") is not None else "0"
        lines.append(f"| {names[name]} | {c['accuracy']:.3f} | " + per_kind + (" | " if kinds else "")
                     + f"{memory} | {c['prompt_tokens']:.1f} |")
    lines += ["", " ".join(f"index recall@{k[len('index_recall@'):]}: {v:.3f}" for k, v in results.items()
                           if k.startswith("index_recall@")), ""]
    paired = results.get("answerable")
    if paired:
        c = results["conditions"]
        lines += [f"On the {paired['rows']} questions with a gold memory: recall {paired['recall']:.3f}, the retrieved "
                  f"memories' text in the prompt {paired['retrieved_text']:.3f} (base model "
                  f"{paired['base_retrieved_text']:.3f}), gold text in the prompt {c['gold_text']['accuracy']:.3f} "
                  f"(base model {c['base_gold_text']['accuracy']:.3f}).", ""]
    seen = results.get("when_retrieved")
    if seen and seen["rows"]:
        gold = "" if seen["base_gold_text"] is None else f" (base model, gold text: {seen['base_gold_text']:.3f})"
        lines += [f"On the {seen['rows']} questions whose memory was retrieved: recall {seen['recall']:.3f}, the "
                  f"retrieved memories' text {seen['retrieved_text']:.3f} (base model "
                  f"{seen['base_retrieved_text']:.3f}){gold}.", ""]
    return "\n".join(lines)
