#!/usr/bin/env python
"""How well do the trained routers tell clean rows from garbage, next to the baselines a practitioner would use?

Runs select_data.py on a labelled file (1 good, 0 garbage) that router training never saw, once per method: the
router score, the model's own perplexity (CCNet-style), IFD (chat rows), and, with --baseline_train_file (the
router's training rows), the supervised baselines: a fastText classifier and a linear probe on the frozen model's
mean-pooled hidden states. Prints the AUROC of every score for separating good from garbage, per corruption kind
when the file has a ``corruption`` column, the precision (share of good rows) of each run's selected rows, and each
method's scoring throughput (rows/s).

--holdout_kinds K1,K2 (or all) asks whether each method detects a corruption it never saw: for each kind, routers
(trained with --router_recipe) and the supervised baselines are trained on --baseline_train_file without that kind's
rows (the file needs a ``corruption`` column) and measured on the good rows and that kind's rows of --data_file.
Perplexity and IFD are zero-shot, so their held-out-kind AUROC is the one above.

    make demo                # chat rows: trains outputs/router, writes data/heldout_chat.jsonl
    python benchmarks/bench_select_quality.py --router_model outputs/router --data_file data/heldout_chat.jsonl \
        --messages_field messages --baseline_train_file data/router.jsonl --json
    # text rows: routers trained on `python -m lib.selection.pools --output_dir data` (data/heldout.jsonl)
    python benchmarks/bench_select_quality.py --router_model outputs/router --data_file data/heldout.jsonl --json

--max_samples N scores only the first N rows (a quick look). The AUROC table shows each score's difference from the
perplexity baseline's AUROC, measured in the same run. With --json the last line printed is a JSON object (auroc per
score, per corruption kind, precision of each selection).
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
    parser.add_argument("--text_field", default="text", help="Column holding plain text.")
    parser.add_argument("--messages_field", default=None,
                        help="Column holding chat messages (rendered with the chat template); overrides --text_field.")
    parser.add_argument("--label_field", default="label")
    parser.add_argument("--score", default="quality_score", help="Router score that ranks the first run.")
    parser.add_argument("--select_ratio", type=float, default=0.3)
    parser.add_argument("--max_seq_length", type=int, default=None, help="Truncation (default: the checkpoint's).")
    parser.add_argument("--max_samples", type=int, default=None, help="Score only the first N rows.")
    parser.add_argument("--batch_size", type=int, default=None, help="Rows per forward pass (select_data's default).")
    parser.add_argument("--baseline_train_file", default=None,
                        help="Labelled rows (the router's training file) for the fasttext and probe baselines.")
    parser.add_argument("--holdout_kinds", default=None,
                        help="Corruption kinds (comma-separated, or all) each left out of training in turn.")
    parser.add_argument("--router_recipe", default=None,
                        help="train_router.py recipe the held-out-kind routers are trained with.")
    parser.add_argument("--router_args", default="",
                        help="More train_router.py arguments for those routers (e.g. '--max_steps 20').")
    parser.add_argument("--output_dir", default="outputs/select_quality")
    parser.add_argument("--json", action="store_true", help="Print a JSON object as the last line.")
    args = parser.parse_args(argv)

    import select_data
    from lib.core.data import check_fields, load_rows, parse_label
    from lib.core.errors import UserError

    # Every label is checked before anything is scored, so a bad row costs seconds, not two scoring runs.
    ds = load_rows(args.data_file)
    if args.max_samples:
        ds = ds.select(range(min(len(ds), args.max_samples)))
    check_fields(ds, args.data_file, text_field=args.text_field, messages_field=args.messages_field,
                 label_field=args.label_field)
    for i, value in enumerate(ds[args.label_field]):
        parse_label(value, args.data_file, i, args.label_field)

    if args.holdout_kinds and not (args.router_recipe and args.baseline_train_file):
        raise UserError("--holdout_kinds trains routers and baselines without each kind: pass --router_recipe and "
                        "--baseline_train_file too.")

    def run(score: str, router_model: str | None = None, train_file: str | None = None, folder: str | None = None
            ) -> tuple[list[dict], list[dict], float | None]:
        out = os.path.join(folder or args.output_dir, score)
        argv = ["--router_model", router_model or args.router_model, "--data_file", args.data_file, "--text_field",
                args.text_field, "--output_dir", out, "--score", score, "--select_ratio", str(args.select_ratio),
                "--overwrite_output_dir", "--disable_tqdm"]
        for flag in ("messages_field", "max_seq_length", "max_samples", "batch_size"):
            if getattr(args, flag):
                argv += [f"--{flag}", str(getattr(args, flag))]
        if score in ("fasttext", "probe"):
            argv += ["--baseline_train_file", train_file or args.baseline_train_file, "--baseline_label_field",
                     args.label_field]
        summary = select_data.main(argv)

        def read(name: str) -> list[dict]:
            with open(os.path.join(out, name), encoding="utf-8") as f:
                return [json.loads(line) for line in f]

        return read("scored.jsonl"), read("selected.jsonl"), summary["timing"]["rows_per_second_rank0"]

    methods = [args.score, "perplexity"] + (["ifd"] if args.messages_field else []) + (
        ["fasttext", "probe"] if args.baseline_train_file else [])
    runs = {method: run(method) for method in methods}
    # The perplexity run on a router checkpoint computes the router scores in the same forward pass too.
    ppl_rows = runs["perplexity"][0]

    def label(row: dict) -> int:  # every label was checked above
        return parse_label(row[args.label_field], args.data_file, 0, args.label_field)

    labels = [label(r) for r in ppl_rows]
    columns = {name: [r.get(name) for r in ppl_rows] for name in ("quality_score", "quality_logodds", "routed_share")}
    for method in methods[1:]:
        columns[method] = [r["selection_score"] for r in runs[method][0]]  # higher is better in every method

    def precision(selected: list[dict]) -> float:
        return sum(label(r) for r in selected) / max(1, len(selected))

    result = {"rows": len(labels), "good": sum(labels), "select_ratio": args.select_ratio,
              "auroc": {name: auroc_on(v, labels) for name, v in columns.items()},
              "precision_selected": {method: precision(runs[method][1]) for method in methods},
              "rows_per_second": {method: runs[method][2] for method in methods},
              "base_rate": sum(labels) / len(labels)}
    print(f"\n{result['rows']} rows ({result['good']} good); AUROC for good vs garbage, higher is better:")
    print(f"{'score':<18}{'AUROC':>8}{'vs perplexity':>15}")
    for name, value in result["auroc"].items():
        print(f"{name:<18}{value:8.3f}{value - result['auroc']['perplexity']:>+15.3f}")
    kinds = sorted({r.get("corruption") for r in ppl_rows if r.get("corruption")})
    if kinds:
        good = [i for i, lab in enumerate(labels) if lab == 1]
        result["auroc_by_corruption"] = {}
        print(f"\n{'corruption':<12}" + "".join(f"{n:>17}" for n in columns))
        for kind in kinds:
            idx = good + [i for i, r in enumerate(ppl_rows) if r.get("corruption") == kind]
            row = {n: auroc_on(v, labels, idx) for n, v in columns.items()}
            result["auroc_by_corruption"][kind] = row
            print(f"{kind:<12}" + "".join(f"{row[n]:17.3f}" for n in columns))
    print(f"\nprecision of the selected {args.select_ratio:.0%} (share of good rows; base rate "
          f"{result['base_rate']:.2f}) and scoring throughput:")
    for method in methods:
        speed = result["rows_per_second"][method]
        print(f"  {method:<16}{result['precision_selected'][method]:.3f}   " +
              (f"{speed:.1f} rows/s" if speed else ""))
    if args.holdout_kinds:
        result["held_out_kind"] = held_out_kinds(args, run, labels, ppl_rows)
    if args.json:
        print(json.dumps(result))
    return result


def auroc_on(values: list, labels: list[int], rows: list[int] | None = None) -> float:
    """AUROC of ``values`` (None: unscored) for ``labels``, over ``rows`` (default: all)."""
    from lib.selection.scores import auroc

    rows = range(len(labels)) if rows is None else rows
    return auroc([float("nan") if values[i] is None else values[i] for i in rows], [labels[i] for i in rows])


def held_out_kinds(args, run, labels: list[int], rows: list[dict]) -> dict:
    """For each kind: routers and baselines trained without it, AUROC on the good rows and that kind's rows."""
    import shlex

    import train_router
    from lib.core.data import load_rows
    from lib.core.errors import DataError

    train = load_rows(args.baseline_train_file)
    if "corruption" not in train.column_names:
        raise DataError(f"{args.baseline_train_file} has no 'corruption' column, so no kind can be left out of it.")
    present = sorted({k for k in train["corruption"] if k})
    kinds = present if args.holdout_kinds == "all" else [k.strip() for k in args.holdout_kinds.split(",")]
    unknown = [k for k in kinds if k not in present]
    if unknown:
        raise DataError(f"--holdout_kinds {unknown} are not corruptions of {args.baseline_train_file} "
                        f"(it has {', '.join(present)}).")
    out: dict = {}
    print("\nheld-out kinds: AUROC on good rows vs rows of a corruption no training row had")
    print(f"{'left out':<12}{'quality_score':>15}{'fasttext':>10}{'probe':>8}{'perplexity':>12}"
          f"{'(seen: router)':>16}")
    for kind in kinds:
        folder = os.path.join(args.output_dir, f"without_{kind}")
        os.makedirs(folder, exist_ok=True)
        train_file = os.path.join(folder, "train.jsonl")
        train.filter(lambda r: r["corruption"] != kind).to_json(train_file, lines=True)
        router = os.path.join(folder, "router")
        train_router.main([args.router_recipe, "--train_file", train_file, "--output_dir", router,
                           "--overwrite_output_dir", "--report_to", "none", *shlex.split(args.router_args)])
        idx = [i for i, r in enumerate(rows) if labels[i] == 1 or r.get("corruption") == kind]
        scores = {"quality_score": [r["quality_score"] for r in run("quality_score", router, None, folder)[0]]}
        for method in ("fasttext", "probe"):
            scores[method] = [r["selection_score"] for r in run(method, None, train_file, folder)[0]]
        row = {m: auroc_on(v, labels, idx) for m, v in scores.items()}
        seen = auroc_on([r["quality_score"] for r in rows], labels, idx)
        ppl = auroc_on([r["selection_score"] for r in rows], labels, idx)
        out[kind] = {**row, "perplexity": ppl, "quality_score_seen": seen}
        print(f"{kind:<12}{row['quality_score']:15.3f}{row['fasttext']:10.3f}{row['probe']:8.3f}{ppl:12.3f}"
              f"{seen:16.3f}", flush=True)
    return out


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
