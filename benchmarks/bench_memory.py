#!/usr/bin/env python
"""Explicit memory, measured: a trained memory model on the fact set's test people and trained people.

    python benchmarks/bench_memory.py --memory_model outputs/memory/final --facts data/facts --limit 120 --json

For the test people (never in a training question; their entries are in the bank): exact match, "contains" and
log-likelihood ranking accuracy of the base model, the base model with the gold entry in the prompt (the in-context
upper bound), and the memory model with the correct, empty, irrelevant and counterfactual bank (how often the answer
follows the edited entry), plus gate hit@1 / hit@k against chance. For the trained people (their questions were
trained on, in other phrasings): the counterfactual follow rate, which exposes answers memorised in the trained
parts instead of read from the bank. Prints each side by side with the ratio to the in-context bound; --json ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONDITIONS = ("base", "in_context", "memory", "empty", "irrelevant", "counterfactual")


def summarise(results: dict) -> dict:
    """The numbers of each condition without the per-row lists."""
    out = {}
    for name in CONDITIONS:
        if name in results:
            out[name] = {k: v for k, v in results[name].items() if isinstance(v, float)}
    out["gate"] = results.get("gate")
    out["empty_equals_base"] = results["empty_equals_base"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory_model", required=True, help="Output folder of a memory stage (e.g. outputs/memory/final).")
    parser.add_argument("--facts", default="data/facts", help="Folder written by python -m lib.memory.facts.")
    parser.add_argument("--limit", type=int, default=120, help="QA rows per group (seeded sample).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_trained", action="store_true", help="Only the test people.")
    parser.add_argument("--json", action="store_true", help="End with one JSON line.")
    args = parser.parse_args(argv)

    import torch

    from lib.memory.bank import MemoryBank
    from lib.memory.evaluation import evaluate_memory, load_qa, results_markdown
    from lib.memory.model import load_memory_model

    start = time.time()
    memory, tokenizer = load_memory_model(args.memory_model, bank=os.path.join(args.facts, "bank.jsonl"))
    length = memory.memory_config.max_entry_tokens
    banks = {"memory": memory.bank,
             "irrelevant": MemoryBank.load(os.path.join(args.facts, "bank_irrelevant.jsonl"), tokenizer,
                                           max_entry_tokens=length),
             "counterfactual": MemoryBank.load(os.path.join(args.facts, "bank_counterfactual.jsonl"), tokenizer,
                                               max_entry_tokens=length)}
    report = {"memory_model": args.memory_model, "stage": memory.memory_config.stage, "limit": args.limit,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    groups = [("test", "qa_test.jsonl", banks)]
    if not args.skip_trained:
        # Trained people: the irrelevant bank holds their entries, so only the counterfactual test says anything.
        groups.append(("trained", "qa_trained.jsonl", {k: banks[k] for k in ("memory", "counterfactual")}))
    for group, name, group_banks in groups:
        rows = load_qa(os.path.join(args.facts, name), args.limit, args.seed)
        results = evaluate_memory(memory, tokenizer, rows, group_banks, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, progress=lambda m, g=group: print(f"[{g}] {m}",
                                                                                                flush=True))
        report[group] = summarise(results)
        print(f"\n{group} people\n" + results_markdown(results, len(rows), name), flush=True)
    test = report["test"]
    bound = test["in_context"].get("ll_accuracy")
    if bound:
        report["memory_over_in_context_ll"] = round(test["memory"]["ll_accuracy"] / bound, 3)
        print(f"memory / in-context upper bound (log-likelihood accuracy): {test['memory']['ll_accuracy']:.3f} / "
              f"{bound:.3f} = {report['memory_over_in_context_ll']:.2f}", flush=True)
    gate = test.get("gate") or {}
    if gate:
        print(f"gate hit@1 {gate['hit@1']:.3f} vs chance {gate['chance@1']:.5f}", flush=True)
    report["total_s"] = round(time.time() - start, 1)
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
