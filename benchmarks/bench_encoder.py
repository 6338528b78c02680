#!/usr/bin/env python
r"""How well does the tool encoder pick tools for held-out queries, against what a user could write without it?

For one tool set (tools.json, training and held-out queries), on the held-out queries, split into semantic and
resource-dependent ones:

- step 0, pure semantics: the frozen LLM's pooled embeddings of the query and of each tool (cosine around the
  tools' mean, as the encoder scores at step 0), for each pooling and layer asked (--poolings, --layers);
- a keyword baseline a user could write in ten lines: the semantically nearest tools (--pooling), and when the
  query names a resource ("fast", "cheap", "memory", "accurate", ...) the one of the --candidates nearest with the
  best value of that resource;
- with --recipe, the trained encoder (pretrain_encoder.py with the recipe, at --pooling): its final top-1 / top-3.

    python benchmarks/bench_encoder.py --json
    python benchmarks/bench_encoder.py --recipe recipes/pretrain_encoder_smollm2.yaml --json

The second tool set (recipes/tools/services/) ships example queries and hand-written held-out ones; its training
queries are generated first:

    python -m lib.tools.queries --tools_file recipes/tools/services/tools.json \
        --examples recipes/tools/services/examples.jsonl --output_dir data/services_queries --heldout_every 0
    python benchmarks/bench_encoder.py --tools_file recipes/tools/services/tools.json \
        --train_file data/services_queries/train_queries.jsonl \
        --validation_file recipes/tools/services/heldout_queries.jsonl --recipe recipes/pretrain_encoder_smollm2.yaml --json

With --json the last line printed is a JSON object with every row of the table.
"""

import argparse
import json
import os
import sys

# Run from anywhere: the scripts and lib/ of this checkout come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# resource key (matched by substring) -> (the better direction, words a query uses when it cares about it)
KEYWORDS = {
    ("latency", "time", "speed"): (min, ("fast", "quick", "latency", "speed", "millisecond", " ms", "real-time",
                                         "instant", "slow")),
    ("memory", "ram", "_gb", "size"): (min, ("memory", "ram", " gb", "phone", "laptop", "embedded", "device",
                                             "small", "lightweight", "no gpu", "cpu")),
    ("cost", "price", "usd"): (min, ("cheap", "cost", "budget", "price", "inexpensive", "money", "afford")),
    ("accuracy", "quality", "score", "precision"): (max, ("accura", "quality", "best", "precis", "state-of-the-art",
                                                          "mistake", "error", "reliab", "top")),
}


def topk_scores(logits, target: list[int], resource: list[int]) -> dict[str, float]:
    """Top-1 / top-3 of ``(queries, tools)`` scores, overall and per kind of query."""
    import torch

    ranked = torch.as_tensor(logits).argsort(dim=-1, descending=True)
    target_t = torch.as_tensor(target)
    top1 = (ranked[:, 0] == target_t).float()
    top3 = (ranked[:, :3] == target_t[:, None]).any(-1).float()
    out = {"top1": top1.mean().item(), "top3": top3.mean().item()}
    for name, flag in (("semantic", 0), ("resource", 1)):
        rows = [i for i, r in enumerate(resource) if r == flag]
        if rows:
            out[f"top1_{name}"] = top1[rows].mean().item()
            out[f"top3_{name}"] = top3[rows].mean().item()
    return out


def keyword_choice(query: str, ranked: list[int], tools, candidates: int) -> int:
    """The baseline: among the ``candidates`` semantically nearest tools, the best on the resource the query's
    words name (the first named), else the nearest."""
    text = f" {query.lower()} "
    for key_parts, (better, words) in KEYWORDS.items():
        if not any(w in text for w in words):
            continue
        near = ranked[:candidates]
        for name in tools[near[0]].resources:
            if any(p in name.lower() for p in key_parts):
                having = [t for t in near if name in tools[t].resources]
                return better(having, key=lambda t, name=name: tools[t].resources[name])
    return ranked[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--tools_file", default="recipes/tools/tools.json")
    parser.add_argument("--train_file", default="recipes/tools/train_queries.jsonl")
    parser.add_argument("--validation_file", default="recipes/tools/heldout_queries.jsonl")
    parser.add_argument("--poolings", default=None, help="Comma-separated (default: every pooling the encoder has).")
    parser.add_argument("--layers", default="-1,middle", help="Decoder layers read (-1: the last; 'middle'); write --layers=-1,middle.")
    parser.add_argument("--candidates", type=int, default=2, help="Nearest tools the keyword baseline chooses among.")
    parser.add_argument("--pooling", default="prompt_last",
                        help="Pooling of the keyword baseline and the trained encoder (the encoder's default).")
    parser.add_argument("--embedding_layer", type=int, default=-1, help="Layer of the baseline and the encoder.")
    parser.add_argument("--recipe", default=None, help="Also train the encoder with this pretrain_encoder.py recipe.")
    parser.add_argument("--output_dir", default="outputs/bench_encoder")
    parser.add_argument("--json", action="store_true", help="Print a JSON object as the last line.")
    args = parser.parse_args(argv)

    import torch

    from lib.models.args import ModelArguments
    from lib.models.loading import load_model_and_tokenizer
    from lib.tools.data import load_tool_queries, load_tools
    from lib.tools.embeddings import POOLINGS, embed_texts
    from lib.tools.losses import tool_logits

    tools = load_tools(args.tools_file)
    names = [t.name for t in tools]
    queries, target, resource = load_tool_queries(args.validation_file, names)
    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=args.model))
    model.eval()
    middle = model.config.num_hidden_layers // 2
    layers = [middle if v.strip() == "middle" else int(v) for v in args.layers.split(",") if v.strip()]
    report: dict = {"tools_file": args.tools_file, "validation_file": args.validation_file, "queries": len(queries),
                    "resource_queries": sum(resource), "step0": [], "model": args.model}
    chosen = (args.pooling, args.embedding_layer)
    poolings = args.poolings.split(",") if args.poolings else POOLINGS
    settings = [(p.strip(), layer) for p in poolings if p.strip() for layer in layers]
    for pooling, layer in settings + ([chosen] if chosen not in settings else []):
        semantic = embed_texts(model, tokenizer, [t.text() for t in tools], pooling=pooling, layer=layer)
        query_emb = embed_texts(model, tokenizer, queries, pooling=pooling, layer=layer)
        scores = tool_logits(query_emb, semantic, semantic.mean(0), 1.0)
        if (pooling, layer) in settings:
            report["step0"].append({"pooling": pooling, "layer": layer, **topk_scores(scores, target, resource)})
        if (pooling, layer) == chosen:
            logits = scores
    row = {"pooling": args.pooling, "layer": args.embedding_layer}
    ranked = logits.argsort(dim=-1, descending=True).tolist()
    picks = [keyword_choice(q, r, tools, args.candidates) for q, r in zip(queries, ranked, strict=True)]
    one_hot = torch.nn.functional.one_hot(torch.tensor(picks), len(tools)).float()
    report["keyword_baseline"] = {"pooling": row["pooling"], "layer": row["layer"], "candidates": args.candidates,
                                  **topk_scores(one_hot * 2 + logits.softmax(-1), target, resource)}
    del model
    if args.recipe:
        import pretrain_encoder

        summary = pretrain_encoder.main([args.recipe, "--model_name_or_path", args.model, "--tools_file",
                                         args.tools_file, "--train_file",
                                         args.train_file, "--validation_file", args.validation_file,
                                         "--pooling", row["pooling"], "--embedding_layer", str(row["layer"]),
                                         "--output_dir", os.path.join(args.output_dir, "encoder"),
                                         "--overwrite_output_dir", "--save_strategy", "no"])
        report["trained"] = {"pooling": row["pooling"], "layer": row["layer"],
                             **{k.removeprefix("eval_"): v for k, v in (summary["final"] or {}).items()
                                if k.startswith("eval_top")},
                             "alpha": summary["alpha"]}

    print(f"\nheld-out queries of {args.validation_file}: {len(queries)} ({sum(resource)} resource-dependent)")
    print(f"{'method':<44}{'top-1':>8}{'semantic':>10}{'resource':>10}{'top-3':>8}")

    def line(label: str, m: dict) -> None:
        print(f"{label:<44}{m['top1']:>8.3f}{m.get('top1_semantic', float('nan')):>10.3f}"
              f"{m.get('top1_resource', float('nan')):>10.3f}{m['top3']:>8.3f}")

    for m in report["step0"]:
        line(f"step 0, {m['pooling']}, layer {m['layer']}", m)
    line(f"keyword baseline ({row['pooling']}, layer {row['layer']})", report["keyword_baseline"])
    if "trained" in report:
        line(f"trained encoder ({row['pooling']}, layer {row['layer']})", report["trained"])
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
