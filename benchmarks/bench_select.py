#!/usr/bin/env python
"""select_data.py's scorer vs a straightforward scorer, and what each of its two speed-ups buys on its own.

select_data.py's scorer differs from a straightforward one in two ways: it sorts rows by length into
token-budgeted batches (less padding), and it stops the forward pass at the last router (the last sparse layer's
experts, later layers, the final norm and the LM head never run). Four scorers score the same pool with the same
model in the same run, under inference mode, with the same batch size and the same score function:

    baseline      input-order batches, full forward with output_router_logits=True and the LM head
    sorted        length-sorted batches only (select_data's batching), full forward
    stop          forward stopped at the last router only (select_data's BatchScorer), input-order batches
    select_data   both: score_shard + BatchScorer, what select_data.py runs

Pools (--pool): ``mixed`` glues four texts into every fifth row, so every input-order batch holds a long row
(the case length sorting is built for); ``natural`` is real rows (Python docs paragraphs, SciQ and
CommonsenseQA texts) shuffled, in their natural length spread, nothing glued.

    python benchmarks/bench_select.py                          # builtin SmolLM2 upcycled to 8 experts, top-2
    python benchmarks/bench_select.py --pool natural --json    # real rows only; last line is JSON
    python benchmarks/bench_select.py --model builtin:tiny-mixtral

A dense model is upcycled (--upcycle_experts, default 8); a model that already has routers is scored with them.
The table also shows what each scorer ran, counted by hooks on the model: padded tokens fed in (padding included)
and whether the LM head ran. With --json the last line printed is a JSON object with speedup (select_data's rows/s over the baseline's) and
max_abs_diff (largest |difference| of quality_score from the baseline's) for the full scorer, and the same
numbers for every scorer under ``variants``.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

# Run from anywhere: the scripts and lib/ of this checkout come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POOLS = ("mixed", "natural")
# name: (batch order, forward pass); the order in which they run and are printed.
VARIANTS = {
    "baseline": ("input order", "full forward + LM head"),
    "sorted": ("length-sorted", "full forward + LM head"),
    "stop": ("input order", "stops at last router"),
    "select_data": ("length-sorted", "stops at last router"),
}


def build_pool(n_rows: int, seed: int, kind: str = "mixed") -> list[str]:
    """``n_rows`` real texts. ``mixed``: every fifth row is four texts glued together; ``natural``: the texts as
    they come, shuffled (cycled when the pool asks for more rows than there are texts)."""
    from lib.selection.pools import benchmark_texts, pydoc_paragraphs

    texts = pydoc_paragraphs(min_chars=20, max_chars=1500) + benchmark_texts()
    rng = random.Random(seed)
    rng.shuffle(texts)
    if kind == "natural":
        return [texts[i % len(texts)] for i in range(n_rows)]
    pool = []
    for i in range(n_rows):
        if i % 5 == 4:  # every fifth row is long, so every input-order batch of 5+ rows holds one
            pool.append(" ".join(rng.sample(texts, 4)))
        else:
            pool.append(texts[i % len(texts)])
    return pool


def input_order_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size)]


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens the model runs over, padding included (every row of a batch is as long as its longest)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def pool_stats(lengths: list[int], truncated: int, batch_size: int, max_batch_tokens: int) -> dict:
    from lib.selection.scorer import length_batches

    ordered = sorted(lengths)
    real = sum(lengths)
    return {
        "tokens_min": ordered[0], "tokens_median": statistics.median(ordered),
        "tokens_mean": round(real / len(lengths), 1), "tokens_p90": ordered[int(0.9 * (len(ordered) - 1))],
        "tokens_max": ordered[-1], "truncated_rows": truncated,
        # The share of the work that is padding: what length sorting can save.
        "padding_share_input_order": round(1 - real / padded_tokens(lengths, input_order_batches(len(lengths),
                                                                                                 batch_size)), 4),
        "padding_share_sorted": round(1 - real / padded_tokens(lengths, length_batches(lengths, batch_size,
                                                                                       max_batch_tokens)), 4),
    }


def baseline_scores(model, tokenizer, texts, masks, top_k, batch_size, max_len, device) -> list[float]:
    """The straightforward scorer: input-order batches, the model's full forward, scores from its router logits."""
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


def batched_scores(texts, forward, *, tokenizer, sort: bool, batch_size: int, max_batch_tokens: int, max_len: int,
                   device) -> list[float]:
    """quality_score of every row (input order) with one of the two speed-ups: ``sort`` batches rows as
    select_data.py does (length-sorted, token-budgeted); ``forward(input_ids, attention_mask)`` runs the model."""
    import torch

    from lib.selection.scorer import length_batches

    ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
    lengths = [len(x) for x in ids]
    batches = (length_batches(lengths, batch_size, max_batch_tokens) if sort
               else input_order_batches(len(ids), batch_size))
    out: list[float] = [float("nan")] * len(ids)
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        input_ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for r, i in enumerate(batch):  # right padding, as select_data.py pads
            input_ids[r, :lengths[i]] = torch.tensor(ids[i])
            mask[r, :lengths[i]] = 1
        for r, score in zip(batch, forward(input_ids.to(device), mask.to(device)), strict=True):
            out[r] = score
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Model to score with.")
    parser.add_argument("--upcycle_experts", type=int, default=None,
                        help="Experts to upcycle a dense model to (default 8); a model that already has routers is "
                             "used as it is.")
    parser.add_argument("--top_k", type=int, default=2, help="Experts per token of the upcycled model.")
    parser.add_argument("--pool", choices=POOLS, default="mixed",
                        help="mixed: every fifth row is four texts glued together (every input-order batch holds a "
                             "long row); natural: real rows in their natural length spread.")
    parser.add_argument("--rows", type=int, default=600, help="Rows in the pool.")
    parser.add_argument("--batch_size", type=int, default=16, help="Rows per batch, every scorer.")
    parser.add_argument("--max_seq_length", type=int, default=256, help="Truncation length, every scorer.")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print a JSON object as the last line.")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.batch_size < 1 or args.max_seq_length < 2:
        parser.error("--rows and --batch_size must be at least 1, --max_seq_length at least 2")

    import torch

    from benchmarks.common import upcycle_experts_for
    from lib.models.loading import load_model, load_tokenizer
    from lib.models.moe import find_moe_routers, keep_routers_fp32
    from lib.models.upcycling import upcycle_to_moe
    from lib.selection.args import SelectArguments
    from lib.selection.scorer import BatchScorer, score_shard
    from lib.selection.scores import router_row_scores
    from lib.selection.split import ExpertSplit

    upcycle = upcycle_experts_for(args.model, args.upcycle_experts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    tokenizer = load_tokenizer(args.model, flag="--model")
    model = load_model(args.model, dtype=dtype, attn_implementation="sdpa", flag="--model")
    if upcycle:
        model = upcycle_to_moe(model, upcycle, args.top_k, noise=0.01)
    model.to(device).eval()
    routers = find_moe_routers(model)
    keep_routers_fp32(routers)
    split = ExpertSplit.by_index(routers, 0.25)
    masks = split.masks(device)
    max_batch_tokens = args.batch_size * args.max_seq_length
    texts = build_pool(args.rows, args.seed, args.pool)
    full_lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    lengths = [min(n, args.max_seq_length) for n in full_lengths]
    stats = pool_stats(lengths, sum(n > args.max_seq_length for n in full_lengths), args.batch_size,
                       max_batch_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}" + (f" upcycled to {upcycle} experts" if upcycle else "")
          + f" ({n_params / 1e6:.0f}M params, {len(routers)} routers, {split.num_experts} experts top-{split.top_k}) "
          f"on {device.type}, {dtype}; batch {args.batch_size} rows, max {args.max_seq_length} tokens", flush=True)
    print(f"pool {args.pool}: {len(texts)} rows, tokens/row min {stats['tokens_min']} median "
          f"{stats['tokens_median']:g} mean {stats['tokens_mean']:g} p90 {stats['tokens_p90']} max "
          f"{stats['tokens_max']} ({stats['truncated_rows']} truncated); padding is "
          f"{stats['padding_share_input_order']:.0%} of the tokens in input-order batches, "
          f"{stats['padding_share_sorted']:.0%} in length-sorted ones", flush=True)

    select_args = SelectArguments(router_model=args.model, data_file="-", output_dir="-",
                                  batch_size=args.batch_size, max_batch_tokens=max_batch_tokens)
    scorer = BatchScorer(model, routers=routers, garbage_masks=masks, top_k=split.top_k)

    def full_forward(input_ids, attention_mask) -> list[float]:
        with torch.inference_mode():
            result = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True,
                           use_cache=False)
            return router_row_scores(list(result.router_logits), masks, attention_mask,
                                     split.top_k)["quality_score"].tolist()

    def stopped_forward(input_ids, attention_mask) -> list[float]:
        return scorer(input_ids, attention_mask)["quality_score"].tolist()

    batching = dict(tokenizer=tokenizer, batch_size=args.batch_size, max_batch_tokens=max_batch_tokens,
                    max_len=args.max_seq_length, device=device)
    scorers = {
        "baseline": lambda rows: baseline_scores(model, tokenizer, rows, masks, split.top_k, args.batch_size,
                                                 args.max_seq_length, device),
        "sorted": lambda rows: batched_scores(rows, full_forward, sort=True, **batching),
        "stop": lambda rows: batched_scores(rows, stopped_forward, sort=False, **batching),
        "select_data": lambda rows: [r["quality_score"] for r in score_shard(
            rows, scorer=scorer, tokenizer=tokenizer, args=select_args, max_len=args.max_seq_length, device=device,
            want_router=True)],
    }

    # What each scorer really runs, counted by hooks on the model: padded tokens fed in, and LM head calls.
    ran = {"padded_tokens": 0, "lm_head_calls": 0}

    def count_tokens(module, inputs, kwargs):
        ids = kwargs.get("input_ids", inputs[0] if inputs else None)
        ran["padded_tokens"] += ids.numel()

    def count_head(module, inputs, output):
        ran["lm_head_calls"] += 1

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    model.get_output_embeddings().register_forward_hook(count_head)

    def timed(fn):
        fn(texts[: args.batch_size])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        ran.update(padded_tokens=0, lm_head_calls=0)
        start, cpu_start = time.perf_counter(), time.process_time()
        scores = fn(texts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ran["cpu_seconds"] = round(time.process_time() - cpu_start, 3)
        return scores, time.perf_counter() - start

    measured = {}
    for name, fn in scorers.items():
        scores, seconds = timed(fn)
        measured[name] = (scores, seconds, dict(ran))
        print(f"  {name:<12} {len(texts) / seconds:8.2f} rows/s ({seconds:.1f} s)", flush=True)

    base_scores, base_s, _ = measured["baseline"]
    variants = {}
    for name, (scores, seconds, counts) in measured.items():
        variants[name] = {
            "batches": VARIANTS[name][0], "forward": VARIANTS[name][1], **counts, "seconds": round(seconds, 3),
            "rows_per_s": round(len(texts) / seconds, 3), "speedup": round(base_s / seconds, 3),
            "cpu_speedup": round(measured["baseline"][2]["cpu_seconds"] / max(1e-9, counts["cpu_seconds"]), 3),
            "max_abs_diff": max(abs(a - b) for a, b in zip(scores, base_scores, strict=True)),
        }

    print(f"\n{'scorer':<13}{'batches':<15}{'forward':<24}{'tokens run':>11}{'LM head':>9}{'rows/s':>9}"
          f"{'speedup':>9}{'CPU s':>9}{'CPU speedup':>13}{'max |diff|':>12}")
    for name, v in variants.items():
        print(f"{name:<13}{v['batches']:<15}{v['forward']:<24}{v['padded_tokens']:>11,}"
              f"{'yes' if v['lm_head_calls'] else 'no':>9}{v['rows_per_s']:>9.2f}{v['speedup']:>8.2f}x"
              f"{v['cpu_seconds']:>9.1f}{v['cpu_speedup']:>12.2f}x{v['max_abs_diff']:>12.1e}")
    print("speedup (wall clock), CPU speedup (baseline's process CPU time over this scorer's: less sensitive to other "
          "processes on the machine) and max |quality_score difference| are against baseline, measured in this run",
          flush=True)

    full = variants["select_data"]
    result = {
        "model": args.model, "upcycle_experts": upcycle, "device": device.type, "dtype": dtype, "pool": args.pool,
        "rows": len(texts), "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "pool_stats": stats, "baseline_rows_per_s": variants["baseline"]["rows_per_s"],
        "rows_per_s": full["rows_per_s"], "speedup": full["speedup"], "max_abs_diff": full["max_abs_diff"],
        "variants": variants,
    }
    if args.json:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
