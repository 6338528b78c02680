#!/usr/bin/env python
"""Retrieval of a recall run's memories with the frozen question vectors vs the query adapter, test users only.

    python benchmarks/bench_query_adapter.py --recall_model outputs/recall --chats data/chats --json

Reads the run's entries and vectors (its index), embeds the generator's training and test questions with the run's
frozen model, trains a query adapter on the training questions as the run does, and prints index recall@1/3/5 of an
entry holding the answer, on the test users' answerable questions:
- frozen vectors vs the adapter, side by side with the ratio;
- the ceiling: questions whose user has any entry holding the answer (what extraction left to find);
- question kinds the adapter never saw: for each kind (the generator's ``attribute``), an adapter trained without
  that kind's training questions, measured on that kind's test questions, against the frozen vectors on the same.
--json ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KS = (1, 3, 5)


def recall_at(index, search, questions) -> dict[str, float]:
    """Share of ``questions`` with an entry of their user that holds the answer among the k nearest to ``search``."""
    from lib.recall.retrieval import answer_rows

    found = {k: 0 for k in KS}
    for vector, question in zip(search.numpy(), questions):
        rows = [r for _, r in index.search_rows(vector[None], str(question["user_id"]), max(KS))[0]]
        for k in KS:
            found[k] += bool(answer_rows(question, rows[:k], index.entries))
    return {f"recall@{k}": found[k] / max(1, len(questions)) for k in KS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recall_model", required=True, help="Output folder of train_memory.py --memory_type recall.")
    parser.add_argument("--chats", default="data/chats", help="Folder written by python -m lib.recall.chats.")
    parser.add_argument("--epochs", type=int, default=10, help="Query adapter epochs (the run's default).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="End with one JSON line.")
    args = parser.parse_args(argv)

    from lib.recall.answer import RecallAssistant
    from lib.recall.probes import load_probes
    from lib.recall.retrieval import answer_rows, question_vectors, search_vectors, train_query_adapter

    start = time.time()
    assistant = RecallAssistant(args.recall_model)
    index, cfg = assistant.index, assistant.model.recall_config
    users = json.load(open(os.path.join(args.chats, "users.json")))
    test_users = {u["user_id"] for u in users if u["split"] == "test"}
    train = [q for q in load_probes(os.path.join(args.chats, "questions_train.jsonl"))
             if str(q["user_id"]) in index.user_rows]
    test = [q for q in load_probes(os.path.join(args.chats, "questions_test.jsonl"))
            if q["user_id"] in test_users and str(q["answer"]).lower() != "unknown"]

    def embed(questions):
        return question_vectors(assistant.model.model, assistant.tokenizer, [q["question"] for q in questions],
                                layer=cfg.vector_layer, template=cfg.vector_template)

    frozen_train, frozen_test = embed(train), embed(test)
    table = index.vectors(list(range(len(index))))

    def adapter_without(kind=None):
        keep = [i for i, q in enumerate(train) if kind is None or q.get("attribute") != kind]
        adapter, _ = train_query_adapter(frozen_train[keep], [train[i] for i in keep], index.entries, table,
                                         index.user_rows, epochs=args.epochs, seed=args.seed)
        return adapter

    out: dict = {"questions": len(test), "training_questions": len(train),
                 "ceiling": sum(bool(answer_rows(q, index.user_rows.get(str(q["user_id"]), []), index.entries))
                                for q in test) / max(1, len(test))}
    out["frozen"] = recall_at(index, frozen_test, test)
    out["adapter"] = recall_at(index, search_vectors(frozen_test, adapter_without()), test)
    kinds = sorted({q.get("attribute") for q in test if q.get("attribute")})
    unseen = {"frozen": {f"recall@{k}": 0.0 for k in KS}, "adapter": {f"recall@{k}": 0.0 for k in KS}}
    for kind in kinds:
        rows = [i for i, q in enumerate(test) if q.get("attribute") == kind]
        mine = [test[i] for i in rows]
        for name, search in (("frozen", frozen_test[rows]),
                             ("adapter", search_vectors(frozen_test[rows], adapter_without(kind)))):
            for key, value in recall_at(index, search, mine).items():
                unseen[name][key] += value * len(rows) / len(test)
    out["unseen_kinds"] = {**unseen, "kinds": len(kinds)}
    out["seconds"] = time.time() - start

    print(f"{len(test)} answerable test questions; an entry of the user holds the answer for {out['ceiling']:.3f}")
    print("index recall     " + "  ".join(f"@{k}" for k in KS))
    for label, name, part in (("frozen", "frozen", out), ("adapter", "adapter", out),
                              ("frozen, unseen", "frozen", unseen), ("adapter, unseen", "adapter", unseen)):
        print(f"{label:16} " + "  ".join(f"{part[name][f'recall@{k}']:.3f}" for k in KS))
    for k in KS:
        key = f"recall@{k}"
        print(f"adapter / frozen @{k}: {out['adapter'][key] / max(1e-9, out['frozen'][key]):.2f}x; on kinds it never "
              f"saw: {unseen['adapter'][key] / max(1e-9, unseen['frozen'][key]):.2f}x")
    print(f"({len(kinds)} kinds, each left out of the adapter's training in turn; {out['seconds']:.0f} s)")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
