#!/usr/bin/env python
"""select_data.py's scorer vs a straightforward scorer, same model, same pool, same run.

The straightforward scorer batches rows in input order, runs the full model with ``output_router_logits=True``
(every layer, every expert, the LM head) and computes the scores from the returned logits afterwards. The
select_data.py scorer sorts rows by length into token-budgeted batches and stops the forward pass at the last
router. Both run under inference mode with the same batch size and the same score function.

    python benchmarks/bench_select.py                          # builtin SmolLM2 upcycled to 8 experts, top-2
    python benchmarks/bench_select.py --rows 2000 --json       # a bigger pool; last line is JSON
    python benchmarks/bench_select.py --model builtin:tiny-mixtral --rows 300

With --json the last line printed is a JSON object with speedup (this scorer's rows/s over the baseline's)
and max_abs_diff (largest |difference| of quality_score between the two).
"""

import argparse
import json
import os
import random
import sys
import time

# Run from anywhere: the scripts and lib/ of this checkout come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_pool(n_rows: int, seed: int) -> list[str]:
    """Real text of mixed length: short Q/A rows, paragraphs, and several paragraphs glued together."""
    from lib.selection.pools import benchmark_texts, pydoc_paragraphs

    texts = pydoc_paragraphs(min_chars=20, max_chars=1500) + benchmark_texts()
    rng = random.Random(seed)
    rng.shuffle(texts)
    pool = []
    for i in range(n_rows):
        if i % 5 == 4:  # every fifth row is long
            pool.append(" ".join(rng.sample(texts, 4)))
        else:
            pool.append(texts[i % len(texts)])
    return pool


def baseline_scores(model, tokenizer, texts, masks, top_k, batch_size, max_len, device):
    import torch

    from lib.selection.scores import router_row_scores

    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt").to(device)
        with torch.inference_mode():
            result = model(**enc, output_router_logits=True, use_cache=False)
            scores = router_row_scores(list(result.router_logits), masks, enc["attention_mask"], top_k)
        out.extend(scores["quality_score"].tolist())
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Model to score with.")
    parser.add_argument("--upcycle_experts", type=int, default=8, help="Upcycle a dense model (0: it is MoE).")
    parser.add_argument("--top_k", type=int, default=2, help="Experts per token of the upcycled model.")
    parser.add_argument("--rows", type=int, default=600, help="Rows in the pool (mixed length).")
    parser.add_argument("--batch_size", type=int, default=16, help="Rows per batch, both scorers.")
    parser.add_argument("--max_seq_length", type=int, default=256, help="Truncation length, both scorers.")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print a JSON object as the last line.")
    args = parser.parse_args(argv)

    import torch

    from lib.models.loading import load_model, load_tokenizer
    from lib.models.moe import find_moe_routers, keep_routers_fp32
    from lib.models.upcycling import upcycle_to_moe
    from lib.selection.args import SelectArguments
    from lib.selection.scorer import BatchScorer, score_shard
    from lib.selection.split import ExpertSplit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, attn_implementation="sdpa")
    if args.upcycle_experts:
        model = upcycle_to_moe(model, args.upcycle_experts, args.top_k, noise=0.01)
    model.to(device).eval()
    routers = find_moe_routers(model)
    if not routers:
        raise SystemExit(f"{args.model} has no routers; pass --upcycle_experts N.")
    keep_routers_fp32(routers)
    split = ExpertSplit.by_index(routers, 0.25)
    masks = split.masks(device)
    texts = build_pool(args.rows, args.seed)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_seq_length)["input_ids"]]
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"{len(routers)} routers, {split.num_experts} experts top-{split.top_k}) on {device.type}, {dtype}; "
          f"pool {len(texts)} rows, tokens/row min {min(lengths)} mean {sum(lengths) / len(lengths):.0f} "
          f"max {max(lengths)}", flush=True)

    select_args = SelectArguments(router_model=args.model, data_file="-", output_dir="-",
                                  batch_size=args.batch_size,
                                  max_batch_tokens=args.batch_size * args.max_seq_length)
    scorer = BatchScorer(model, routers=routers, garbage_masks=masks, top_k=split.top_k)

    def ours(rows):
        return [r["quality_score"] for r in score_shard(rows, scorer=scorer, tokenizer=tokenizer, args=select_args,
                                                        max_len=args.max_seq_length, device=device,
                                                        want_router=True)]

    def baseline(rows):
        return baseline_scores(model, tokenizer, rows, masks, split.top_k, args.batch_size, args.max_seq_length,
                               device)

    def timed(fn):
        fn(texts[: args.batch_size])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = fn(texts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return scores, time.perf_counter() - start

    base_scores, base_s = timed(baseline)
    print(f"baseline (input order, full forward + LM head): {len(texts) / base_s:8.2f} rows/s ({base_s:.1f} s)",
          flush=True)
    our_scores, our_s = timed(ours)
    print(f"select_data scorer (length-sorted, stops at last router): {len(texts) / our_s:8.2f} rows/s "
          f"({our_s:.1f} s)", flush=True)
    diff = max(abs(a - b) for a, b in zip(our_scores, base_scores, strict=True))
    result = {
        "model": args.model, "device": device.type, "dtype": dtype, "rows": len(texts),
        "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "baseline_rows_per_s": round(len(texts) / base_s, 3), "rows_per_s": round(len(texts) / our_s, 3),
        "speedup": round(base_s / our_s, 3), "max_abs_diff": diff,
    }
    print(f"speedup {result['speedup']:.2f}x, max |quality_score difference| {diff:.2e}", flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
