#!/usr/bin/env python
"""Recall memory, measured on the chat generator's test users (their values are invented words: an answer can only
come from memory).

    python benchmarks/bench_recall.py --recall_model outputs/recall --chats data/chats --limit 120 --json
    python benchmarks/bench_recall.py --index_only --sizes 100000,1000000 --json
    python benchmarks/bench_recall.py --extract_only --chats data/chats --json

- extraction precision / recall / F1 of the run's entries (current and replaced) against the generator's facts:
  an entry is right when it names one of its user's fact values (skipped when the run was given its memories); and
  the changed facts: how many earlier values left memory, how many replaced entries were still true (with
  --extract_only: extraction and merging alone, on every user, without a trained model);
- index recall@1 / @5: a retrieved entry of the asking user holds the answer;
- reconstruction from ``<recall>`` + vector on trained entries: exact match and token accuracy, and the controls
  (zero, another entry's, random vector) that must collapse; held-out folds from the run's summary.json;
- QA accuracy with recall vs no memory vs the same retrieved memories' text in the prompt (what one token per
  memory costs) vs the gold memory text in the prompt (the upper bound), with the context tokens each uses, split
  into facts, updated facts (latest value) and unknown questions;
- index search time at each --sizes for the approximate index (IVF, what the memory index builds above its exact
  limit) vs exact brute force, with recall@10, on clustered vectors of the model's width.
Prints each side by side with its ratio; --json ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def extraction_scores(entries: list[dict], history: list[dict], facts: list[dict], users: set[str]) -> dict:
    """Of ``users``' entries (``entries`` in memory, ``history`` replaced by later ones): precision, the entries that
    name one of their user's fact values; recall, the facts named by an entry of their user. Updates: of the facts a
    later one changed whose earlier value was extracted, those whose earlier value left memory; wrong replacements:
    replaced entries that name a value the user still has."""
    from lib.recall.evaluation import normalise

    def names(text: str, value: str) -> bool:
        return f" {normalise(value)} " in f" {normalise(text)} "

    mine = [e for e in entries + history if e["user_id"] in users]
    gold = [f for f in facts if f["user_id"] in users]
    values: dict[str, list[str]] = {}
    current: dict[str, list[str]] = {}
    for f in gold:
        values.setdefault(f["user_id"], []).append(f["value"])
        if f["current"]:
            current.setdefault(f["user_id"], []).append(f["value"])
    right = sum(any(names(e["text"], v) for v in values.get(e["user_id"], ())) for e in mine)
    found = sum(any(names(e["text"], f["value"]) for e in mine if e["user_id"] == f["user_id"]) for f in gold)
    precision = right / max(1, len(mine))
    recall = found / max(1, len(gold))
    changed = [f for f in gold if not f["current"] and any(names(e["text"], f["value"]) for e in mine
                                                            if e["user_id"] == f["user_id"])]
    left = [f for f in changed if not any(names(e["text"], f["value"]) for e in entries
                                          if e["user_id"] == f["user_id"])]
    replaced = [e for e in history if e["user_id"] in users]
    wrong = [e for e in replaced if any(names(e["text"], v) for v in current.get(e["user_id"], ()))]
    return {"entries": len(mine), "facts": len(gold), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(1e-9, precision + recall), "updates_extracted": len(changed),
            "updates_replaced": len(left), "replaced": len(replaced), "wrong_replacements": len(wrong)}


def extract_only(model_name: str, chats: str) -> tuple[list[dict], list[dict], int, float]:
    """Extraction and merging as ``train_memory.py --memory_type recall`` runs them (its defaults), on every
    conversation of ``chats``: ``(entries, replaced, messages read, seconds)``."""
    from lib.models.args import ModelArguments
    from lib.models.loading import load_model_and_tokenizer
    from lib.recall.args import RecallModelArguments
    from lib.recall.extraction import extract_entries
    from lib.recall.logs import read_conversations
    from lib.recall.updates import merge_entries

    defaults = RecallModelArguments()
    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=model_name))
    tokenizer.padding_side = "left"
    start = time.time()
    new, read = extract_entries(model.eval(), tokenizer, read_conversations(os.path.join(chats, "logs")),
                                batch_size=defaults.extraction_batch_size,
                                max_new_tokens=defaults.extraction_max_new_tokens,
                                check_grounding=defaults.check_grounding, min_logprob=defaults.extraction_min_logprob)
    entries, replaced = merge_entries([], new)
    return entries, replaced, read, time.time() - start


def print_extraction(e: dict, who: str) -> None:
    print(f"extraction ({e['extractor']}, {who}): precision {e['precision']:.3f}, recall {e['recall']:.3f}, "
          f"F1 {e['f1']:.3f} ({e['entries']} entries, {e['facts']} facts); changed facts whose earlier value was "
          f"extracted: {e['updates_replaced']} of {e['updates_extracted']} replaced by the later value; "
          f"{e['wrong_replacements']} of {e['replaced']} replaced entries named a value the user still has")


def index_speed(n: int, dim: int, *, queries: int = 200, k: int = 10, seed: int = 0) -> dict:
    """IVF (as the memory index builds it above its exact limit) vs exact search over ``n`` clustered vectors:
    seconds per query, the ratio, and recall@k of the approximate neighbours."""
    import faiss
    import numpy as np

    from lib.recall.index import _unit, ivf_index

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    data = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    query = centres[rng.integers(0, len(centres), queries)] + 0.6 * rng.standard_normal((queries, dim)).astype(
        np.float32)
    data, query = _unit(data), _unit(query)
    start = time.perf_counter()
    approx = ivf_index(data, seed=seed)
    build = time.perf_counter() - start
    flat = faiss.IndexFlatIP(dim)
    flat.add(data)
    start = time.perf_counter()
    _, exact_ids = flat.search(query, k)
    exact_time = (time.perf_counter() - start) / queries
    start = time.perf_counter()
    _, ids = approx.search(query, k)
    approx_time = (time.perf_counter() - start) / queries
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)]))
    return {"entries": n, "dim": dim, "build_s": build, "exact_ms": exact_time * 1e3, "ivf_ms": approx_time * 1e3,
            "lists": approx.nlist, "nprobe": approx.nprobe, "speedup": exact_time / approx_time, f"recall@{k}": recall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recall_model", help="Output folder of train_memory.py --memory_type recall.")
    parser.add_argument("--chats", default="data/chats", help="Folder written by python -m lib.recall.chats.")
    parser.add_argument("--limit", type=int, default=120, help="Test questions and entries measured (seeded).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32, help="Answers recite a memory first.")
    parser.add_argument("--sizes", default="100000,1000000", help="Index sizes timed (comma-separated; empty: none).")
    parser.add_argument("--index_only", action="store_true", help="Only the index timing.")
    parser.add_argument("--extract_only", action="store_true",
                        help="Only extraction and merging with --model, on every user of --chats (no training).")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="The extractor of --extract_only.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="End with one JSON line.")
    args = parser.parse_args(argv)
    if not args.index_only and not args.extract_only and not args.recall_model:
        parser.error("--recall_model is needed (or --index_only, or --extract_only)")
    if args.extract_only:
        entries, replaced, read, seconds = extract_only(args.model, args.chats)
        users = {u["user_id"] for u in json.load(open(os.path.join(args.chats, "users.json")))}
        out = {"extraction": {**extraction_scores(entries, replaced, read_jsonl(os.path.join(args.chats,
                                                                                          "facts.jsonl")), users),
                              "extractor": args.model, "messages_read": read, "seconds": seconds}}
        print_extraction(out["extraction"], f"all {len(users)} users, {read} messages, {seconds:.0f} s")
        if args.json:
            print(json.dumps(out))
        return out

    import random

    import torch

    out: dict = {}
    dim = 576
    if not args.index_only:
        from lib.recall.answer import RecallAssistant
        from lib.recall.evaluation import reconstruction
        from lib.recall.probes import evaluate_probes, load_probes, probes_markdown

        start = time.time()
        users = json.load(open(os.path.join(args.chats, "users.json")))
        test_users = {u["user_id"] for u in users if u["split"] == "test"}
        summary = json.load(open(os.path.join(args.recall_model, "summary.json")))
        entries = read_jsonl(os.path.join(args.recall_model, "memories.jsonl"))
        history = read_jsonl(os.path.join(args.recall_model, "history.jsonl"))
        if summary["counts"].get("messages_read"):
            out["extraction"] = extraction_scores(entries, history, read_jsonl(os.path.join(args.chats,
                                                                                          "facts.jsonl")), test_users)
            out["extraction"]["extractor"] = summary["settings"]["extractor_model"]
        assistant = RecallAssistant(args.recall_model)
        dim = assistant.model.recall_config.vector_dim
        probes = load_probes(os.path.join(args.chats, "questions_test.jsonl"), args.limit, args.seed)
        hits = assistant.retrieve([p["question"] for p in probes], [p["user_id"] for p in probes], k=5)
        known = [(p, h) for p, h in zip(probes, hits) if p["answer"] != "unknown"]
        from lib.recall.evaluation import holds_answer

        for k in (1, 5):
            out[f"index_recall@{k}"] = sum(
                any(holds_answer(assistant.index.entries[r]["text"], str(p["answer"])) for _, r in h[:k])
                for p, h in known) / max(1, len(known))
        rows = [i for i, e in enumerate(assistant.index.entries) if e["user_id"] in test_users]
        rows = sorted(random.Random(args.seed).sample(rows, min(args.limit, len(rows))))
        vectors = torch.from_numpy(assistant.index.vectors(rows))
        out["reconstruction_trained"] = reconstruction(
            assistant.model, assistant.tokenizer, [assistant.index.entries[r]["text"] for r in rows], vectors,
            batch_size=args.batch_size)
        if "k_fold" in summary:
            out["reconstruction_held_out"] = {k: v for k, v in summary["k_fold"].items() if k != "folds"}
        out["qa"] = evaluate_probes(assistant, probes, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    progress=lambda m: print(m, flush=True))
        out["qa"].pop("examples", None)
        out["training"] = {"counts": summary["counts"], "times": summary["times"]}
        out["seconds"] = time.time() - start

        print("\n" + probes_markdown(out["qa"], "questions_test.jsonl (test users)"))
        c = out["qa"]["conditions"]
        upper = max(c.get("gold_text", {}).get("accuracy", 0), c.get("base_gold_text", {}).get("accuracy", 0))
        # Same questions on both sides: the bound is never asked the unknown ones (they have no gold memory); a bound
        # exists only when some question has one, and then so does the paired recall.
        paired = out["qa"].get("answerable")
        out["recall_vs_upper_bound"] = paired["recall"] / upper if upper else None
        # What one token per memory costs apart from extraction and retrieval: the same retrieved memories as text.
        same = max(paired["retrieved_text"], paired["base_retrieved_text"]) if paired else 0
        out["recall_vs_retrieved_text"] = paired["recall"] / same if same else None
        rec = out["reconstruction_trained"]
        print(f"index recall@1 {out['index_recall@1']:.3f}, @5 {out['index_recall@5']:.3f} "
              f"({len(known)} answerable questions)")
        print(f"reconstruction, trained entries ({rec['entries']}): exact match {rec['exact_match']:.3f}, token "
              f"accuracy {rec['token_accuracy']:.3f}; controls " +
              ", ".join(f"{k} {v:.3f}" for k, v in rec["controls"].items()))
        if "reconstruction_held_out" in out:
            h = out["reconstruction_held_out"]
            print(f"reconstruction, held-out folds: exact match {h['exact_match_mean']:.3f} ± "
                  f"{h['exact_match_std']:.3f}, token accuracy {h['token_accuracy_mean']:.3f} ± "
                  f"{h['token_accuracy_std']:.3f}")
        if "extraction" in out:
            print_extraction(out["extraction"], "test users")
        if out["recall_vs_upper_bound"] is not None:
            print(f"QA with recall / gold text in the prompt, questions with a gold memory: {paired['recall']:.3f} / "
                  f"{upper:.3f} = "
                  f"{out['recall_vs_upper_bound']:.2f} (memory tokens {c['recall']['memory_tokens']:.1f} vs "
                  f"{c['gold_text']['memory_tokens']:.1f})")
        if out["recall_vs_retrieved_text"] is not None:
            print(f"QA with recall / the same retrieved memories' text in the prompt (the better of base and recall "
                  f"model), same questions: {paired['recall']:.3f} / {same:.3f} = "
                  f"{out['recall_vs_retrieved_text']:.2f} "
                  f"(memory tokens {c['recall']['memory_tokens']:.1f} vs {c['retrieved_text']['memory_tokens']:.1f})")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out["index_speed"] = []
    for n in sizes:
        speed = index_speed(n, dim, seed=args.seed)
        out["index_speed"].append(speed)
        print(f"index, {n:,} entries: IVF ({speed['lists']} lists, {speed['nprobe']} probed) {speed['ivf_ms']:.3f} ms "
              f"vs exact {speed['exact_ms']:.3f} ms per query "
              f"= {speed['speedup']:.1f}x, recall@10 {speed['recall@10']:.3f} (build {speed['build_s']:.0f} s)",
              flush=True)
    if args.json:
        print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()
