#!/usr/bin/env python
"""Does the selection matter? Train the target on the top, a random and the bottom share of one scored pool.

From select_data.py's scored file, take the top 30% by selection_score, a seeded random 30% and the bottom 30%
of the scored rows; LoRA-train the target model on each with the same recipe, steps and seed (train_target.py);
then measure each adapter's held-out loss on clean conversations and its lm-eval accuracy (evaluate.py's
machinery), next to the untouched base model.

    make demo        # or any run of select_data.py
    python benchmarks/bench_selection_effect.py --scored outputs/selected/scored.jsonl --json

With --json the last line printed is a JSON object with top_acc, random_acc and bottom_acc (mean accuracy over
--tasks) and the matching held-out losses.
"""

import argparse
import gc
import json
import os
import random
import sys

# Run from anywhere: the scripts and lib/ of this checkout come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subsets(rows: list[dict], ratio: float, seed: int) -> dict[str, list[dict]]:
    """The top, a seeded random and the bottom ``ratio`` share of the pool, drawn from the rows with a score.

    Sized as select_data.py sizes its selection (``ratio`` of every row, at most the scored ones), so ``top`` is
    exactly what select_data.py keeps at ``--select_ratio ratio``: ties rank in file order and rows without a
    selection_score are in no subset. All three have the same size.
    """
    from lib.core.errors import DataError

    scored = [r for r in rows if r.get("selection_score") is not None]
    if not scored:
        raise DataError("The scored file has no row with a selection_score; score the pool with select_data.py first.")
    k = min(len(scored), max(1, round(ratio * len(rows))))
    ranked = sorted(range(len(scored)), key=lambda i: (-scored[i]["selection_score"], i))
    picked = sorted(random.Random(seed).sample(range(len(scored)), k))
    return {"top": [scored[i] for i in ranked[:k]], "random": [scored[i] for i in picked],
            "bottom": [scored[i] for i in ranked[-k:]]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scored", default="outputs/selected/scored.jsonl", help="select_data.py's scored file.")
    parser.add_argument("--recipe", default="recipes/train_target_smollm2.yaml", help="train_target.py recipe.")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Target model.")
    parser.add_argument("--messages_field", default="messages", help="Chat column ('' for text rows).")
    parser.add_argument("--dataset_text_field", default="text", help="Text column when --messages_field is ''.")
    parser.add_argument("--heldout", default="data/target_heldout.jsonl", help="Clean rows for the held-out loss.")
    parser.add_argument("--ratio", type=float, default=0.3, help="Share of the pool in each subset.")
    parser.add_argument("--max_steps", type=int, default=40, help="Training steps, the same for every subset.")
    parser.add_argument("--tasks", default="arc_easy,piqa", help="lm-eval tasks.")
    parser.add_argument("--limit", type=float, default=200, help="lm-eval examples per task.")
    parser.add_argument("--output_dir", default="outputs/selection_effect")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print a JSON object as the last line.")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.scored):
        from lib.core.errors import UserError

        raise UserError(f"--scored {args.scored} does not exist; run select_data.py first (its scored.jsonl).")

    import importlib.util

    import train_target
    from lib.eval.harness import metric_rows
    from lib.selection.pools import write_jsonl

    # evaluate.py is a script whose name shadows the `evaluate` library: load it under another name.
    spec = importlib.util.spec_from_file_location(
        "sidekit_evaluate_script", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "evaluate.py"))
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)

    def evaluate(output_dir: str, *extra: str) -> dict:
        return evaluate_script.main(["--model_name_or_path", args.model, "--tasks", args.tasks, "--limit",
                                     str(args.limit), "--output_dir", output_dir, *extra])

    with open(args.scored, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    parts = subsets(rows, args.ratio, args.seed)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    field = (["--messages_field", args.messages_field] if args.messages_field
             else ["--dataset_text_field", args.dataset_text_field])
    results: dict[str, dict] = {}

    def accuracies(run: dict) -> dict[str, float]:
        table = metric_rows(run)
        return {t: table[(t, "acc")][0] for t in tasks if (t, "acc") in table}

    base = evaluate(os.path.join(args.output_dir, "eval_base"))
    results["base"] = {"acc": accuracies(base["runs"]["base"]), "rows": 0, "clean_share": None}
    for name, subset in parts.items():
        data = os.path.join(args.output_dir, f"{name}.jsonl")
        write_jsonl(subset, data)
        out = os.path.join(args.output_dir, name)
        train_target.main([args.recipe, "--model_name_or_path", args.model, "--train_file", data, *field,
                           "--validation_file", args.heldout, "--output_dir", out, "--overwrite_output_dir",
                           "--max_steps", str(args.max_steps), "--seed", str(args.seed), "--eval_strategy", "no",
                           "--save_strategy", "no", "--report_to", "none"])
        with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        loss = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h][-1]
        ev = evaluate(os.path.join(out, "eval"), "--adapter", out, "--skip_base")
        labels = [r.get("label") for r in subset if r.get("label") is not None]
        results[name] = {"acc": accuracies(ev["runs"]["tuned"]), "heldout_loss": loss, "rows": len(subset),
                         "clean_share": sum(int(v) for v in labels) / len(labels) if labels else None}
        gc.collect()

    print(f"\nselection effect: {args.ratio:.0%} subsets of {args.scored}, {args.max_steps} LoRA steps each, "
          f"lm-eval limit {args.limit}")
    header = f"{'subset':<8}{'rows':>6}{'clean':>7}{'heldout loss':>14}" + "".join(f"{t:>12}" for t in tasks) + \
        f"{'mean acc':>10}"
    print(header)
    summary: dict = {"tasks": tasks, "ratio": args.ratio, "max_steps": args.max_steps, "limit": args.limit}
    for name, r in results.items():
        mean = sum(r["acc"].values()) / max(1, len(r["acc"]))
        r["mean_acc"] = mean
        clean = f"{r['clean_share']:.2f}" if r["clean_share"] is not None else "–"
        loss = f"{r['heldout_loss']:.4f}" if "heldout_loss" in r else "–"
        print(f"{name:<8}{r['rows']:>6}{clean:>7}{loss:>14}" + "".join(f"{r['acc'].get(t, float('nan')):12.4f}"
                                                                      for t in tasks) + f"{mean:10.4f}")
        summary[f"{name}_acc"] = mean
        if "heldout_loss" in r:
            summary[f"{name}_heldout_loss"] = r["heldout_loss"]
        summary[f"{name}_per_task"] = r["acc"]
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
