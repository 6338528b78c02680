#!/usr/bin/env python
"""How well do the trained routers tell clean rows from garbage, next to the perplexity baseline?

Runs select_data.py twice on a labelled file (1 good, 0 garbage) that router training never saw: once ranking by
the router score and once by the model's own perplexity (CCNet-style). Prints the AUROC of every score for
separating good from garbage, per corruption kind when the file has a ``corruption`` column, and the precision
(share of good rows) of each run's selected rows.

    make demo                                   # trains outputs/router on data/pool.jsonl
    python benchmarks/bench_select_quality.py --router_model outputs/router --data_file data/heldout.jsonl --json

With --json the last line printed is a JSON object (auroc per score, precision of each selection).
"""

import argparse
import json
import os
import sys

# Run from anywhere: the scripts and lib/ of this checkout come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router_model", required=True, help="A train_router.py checkpoint.")
    parser.add_argument("--data_file", required=True, help="Labelled rows the routers were not trained on.")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--label_field", default="label")
    parser.add_argument("--score", default="quality_score", help="Router score that ranks the first run.")
    parser.add_argument("--select_ratio", type=float, default=0.3)
    parser.add_argument("--max_seq_length", type=int, default=None)
    parser.add_argument("--output_dir", default="outputs/select_quality")
    parser.add_argument("--json", action="store_true", help="Print a JSON object as the last line.")
    args = parser.parse_args(argv)

    import select_data
    from lib.selection.scores import auroc

    def run(score: str) -> tuple[list[dict], list[dict]]:
        out = os.path.join(args.output_dir, score)
        argv = ["--router_model", args.router_model, "--data_file", args.data_file, "--text_field", args.text_field,
                "--output_dir", out, "--score", score, "--select_ratio", str(args.select_ratio),
                "--overwrite_output_dir"]
        if args.max_seq_length:
            argv += ["--max_seq_length", str(args.max_seq_length)]
        select_data.main(argv)
        read = lambda name: [json.loads(line) for line in open(os.path.join(out, name), encoding="utf-8")]  # noqa: E731
        return read("scored.jsonl"), read("selected.jsonl")

    router_rows, router_selected = run(args.score)
    # The perplexity run on a router checkpoint computes the router scores in the same forward pass too.
    ppl_rows, ppl_selected = run("perplexity")
    labels = [int(r[args.label_field]) for r in ppl_rows]
    columns = {name: [r.get(name) for r in ppl_rows] for name in ("quality_score", "quality_logodds", "routed_share")}
    columns["perplexity"] = [r["selection_score"] for r in ppl_rows]  # -log perplexity: higher is better

    def nan_none(values):
        return [float("nan") if v is None else v for v in values]

    result = {"rows": len(labels), "good": sum(labels), "select_ratio": args.select_ratio,
              "auroc": {name: auroc(nan_none(v), labels) for name, v in columns.items()},
              "precision_selected": {
                  args.score: sum(int(r[args.label_field]) for r in router_selected) / max(1, len(router_selected)),
                  "perplexity": sum(int(r[args.label_field]) for r in ppl_selected) / max(1, len(ppl_selected))},
              "base_rate": sum(labels) / len(labels)}
    print(f"\n{result['rows']} rows ({result['good']} good); AUROC for good vs garbage, higher is better:")
    print(f"{'score':<18}{'AUROC':>8}")
    for name, value in result["auroc"].items():
        print(f"{name:<18}{value:8.3f}")
    kinds = sorted({r.get("corruption") for r in ppl_rows if r.get("corruption")})
    if kinds:
        good = [i for i, lab in enumerate(labels) if lab == 1]
        result["auroc_by_corruption"] = {}
        print(f"\n{'corruption':<12}" + "".join(f"{n:>17}" for n in columns))
        for kind in kinds:
            idx = good + [i for i, r in enumerate(ppl_rows) if r.get("corruption") == kind]
            row = {n: auroc(nan_none([v[i] for i in idx]), [labels[i] for i in idx]) for n, v in columns.items()}
            result["auroc_by_corruption"][kind] = row
            print(f"{kind:<12}" + "".join(f"{row[n]:17.3f}" for n in columns))
    print(f"\nprecision of the selected {args.select_ratio:.0%} (share of good rows; base rate "
          f"{result['base_rate']:.2f}): {args.score} {result['precision_selected'][args.score]:.3f}, "
          f"perplexity {result['precision_selected']['perplexity']:.3f}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
