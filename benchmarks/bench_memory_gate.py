#!/usr/bin/env python
"""The memory gate's product-key lookup vs brute force over every entry: time per query batch, memory, growth.

    python benchmarks/bench_memory_gate.py --json            # N = 2^16, 2^18, 2^20, 2^22; placement at 2^20
    python benchmarks/bench_memory_gate.py --quick --json    # N = 2^10, 2^12; placement at 2^12 (seconds)

Every bank of N = 2^e entries (--sizes) has random unit-norm keys (N, key_dim) in a grid of side ceil(sqrt(N)).
Built once per bank and timed apart: the entries' cells, the gate's row and column sub-keys (MemoryGate.sub_keys)
and the cell -> entry table. Then the same --queries random unit-norm queries are answered two ways:

    product key   MemoryGate.half_scores against the side row and side column sub-keys, then MemoryGate.lookup:
                  the top --candidates rows x columns, combined (what the gate runs per query batch)
    brute force   the same row and column scores, expanded to every entry, row_score[row(e)] + col_score[col(e)]
                  (the score the product keys give entry e), then topk over all N entries

Both sum the same float32 numbers, so they must return the same top-k: identical_topk is true when their entries
and scores are equal, in order. The brute force here is the cheapest one there is (O(N) additions per query, not a
scan of N key vectors), so the ratio brute/product is a lower bound on what the product keys save.

Cells: banks up to 2^--placement_size use the real content placement (place_entries, one timed run each); larger
banks use a random permutation of the cells, which changes neither the lookup's result nor its cost (both only read
which entry sits in which cell). place_entries is always timed at 2^--placement_size, on its own bank if that size
is not in --sizes. Note that MemoryGate.lookup widens its candidate window by the number of empty cells, so for N
not a perfect square (odd exponents) it combines far more cells than --candidates**2.

Times are medians of --repeats runs after one warm-up, at the same torch thread count for both paths: one by
default, because on a busy machine every multi-threaded op waits for a free core, which buries the product path's
small ops (--threads 0 takes torch's default, all cores; place_entries' numpy matrix products use numpy's own
threads either way). Peak memory is measured, not computed: the torch profiler's allocation events during one
query batch, replayed, give the largest total of tensors the path held at once (its outputs included). Index
memory (what each path keeps per bank) is computed from the tensors' sizes. With --json the last line printed is
one JSON object: a row per size under ``sizes``, the placement time under ``placement``, and the torch version,
threads and CPU count.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

# Run from anywhere: the scripts and lib/ of this checkout come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 1024 ** 2
BRUTE_CHUNK = 2 ** 24  # score elements the brute force holds at once: queries go through in chunks of this many


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_bytes(fn) -> int:
    """Largest total of torch allocations alive at once while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw events keep every allocation (+bytes) and free (-bytes) in order; key_averages() only sums them.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def unit_rows(n: int, dim: int, generator):
    import torch

    return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)


def brute_force(gate, queries, row_keys, col_keys, entry_row, entry_col):
    """Top-k entries and scores of every query, scoring all N entries (in query chunks of BRUTE_CHUNK scores)."""
    import torch

    rs, cs = gate.half_scores(queries, row_keys, col_keys)
    step = max(1, BRUTE_CHUNK // len(entry_row))
    entries, scores = [], []
    for start in range(0, len(queries), step):
        chunk = rs[start:start + step].index_select(1, entry_row)  # (chunk, N): every entry's row score ...
        chunk += cs[start:start + step].index_select(1, entry_col)  # ... plus its column score
        s, e = chunk.topk(gate.top_k, dim=-1)
        scores.append(s)
        entries.append(e)
    return torch.cat(entries), torch.cat(scores)


def measure_size(exponent: int, args, gate, queries) -> dict:
    import torch

    from lib.memory.placement import grid_side, place_entries

    n = 2 ** exponent
    side = grid_side(n)
    generator = torch.Generator().manual_seed(args.seed + exponent)
    keys = unit_rows(n, args.key_dim, generator)
    placement_s = None
    if exponent <= args.placement_size:
        start = time.perf_counter()
        cells = place_entries(keys, seed=args.seed)
        placement_s = time.perf_counter() - start
    else:
        cells = torch.randperm(side * side, generator=generator)[:n]

    start = time.perf_counter()
    row_keys, col_keys = gate.sub_keys(keys, cells, side)
    cell_entry = torch.full((side * side,), -1, dtype=torch.long)
    cell_entry[cells] = torch.arange(n)
    index_ms = (time.perf_counter() - start) * 1e3
    del keys  # neither path reads the full keys
    entry_row, entry_col = cells // side, cells % side

    def product():
        return gate.lookup(*gate.half_scores(queries, row_keys, col_keys), cell_entry)

    def brute():
        return brute_force(gate, queries, row_keys, col_keys, entry_row, entry_col)

    product_ms = median_ms(product, args.repeats)
    brute_ms = median_ms(brute, args.repeats)
    # Part of the product time that grows like N, not sqrt(N): lookup counts the empty cells of the whole grid.
    empty_count_ms = median_ms(lambda: int((cell_entry < 0).sum()), args.repeats)
    chosen, scores, valid = product()
    ref_entries, ref_scores = brute()
    identical = bool(valid.all()) and torch.equal(chosen, ref_entries) and torch.equal(scores, ref_scores)
    product_ms, brute_ms = round(product_ms, 4), round(brute_ms, 4)
    return {
        "exponent": exponent, "n": n, "side": side, "empty_cells": side * side - n,
        "placement": "content" if placement_s is not None else "random cells",
        "placement_s": None if placement_s is None else round(placement_s, 3),
        "index_ms": round(index_ms, 3),
        "product_ms": product_ms, "brute_ms": brute_ms, "ratio": round(brute_ms / product_ms, 2),
        "empty_count_ms": round(empty_count_ms, 4),
        "identical_topk": identical, "max_score_diff": float((scores - ref_scores).abs().max()),
        "product_peak_bytes": peak_bytes(product), "brute_peak_bytes": peak_bytes(brute),
        # Kept per bank: the sub-keys (side x key_dim floats) and the cell -> entry table (product), or the
        # sub-keys and every entry's row and column (brute force).
        "product_index_bytes": row_keys.nbytes + col_keys.nbytes + cell_entry.nbytes,
        "brute_index_bytes": row_keys.nbytes + col_keys.nbytes + entry_row.nbytes + entry_col.nbytes,
    }


def growth_exponent(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(time) over log(N): 0.5 grows like sqrt(N), 1 like N."""
    if len(rows) < 2:
        return None
    xs = [math.log(r["n"]) for r in rows]
    ys = [math.log(r[key]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def print_table(rows: list[dict]) -> None:
    columns = [("N", 9), ("side", 6), ("cells", 13), ("product ms", 11), ("brute ms", 11), ("brute/prod", 11),
               ("identical", 10), ("prod xprev", 11), ("sqrtN xprev", 12), ("brute xprev", 12),
               ("empty-count ms", 15), ("prod peak MiB", 14), ("brute peak MiB", 15)]
    print("\n" + "".join(f"{title:>{width}}" for title, width in columns))
    prev = None
    for r in rows:
        growth = ["–"] * 3
        if prev:
            growth = [f"{r['product_ms'] / prev['product_ms']:.2f}", f"{math.sqrt(r['n'] / prev['n']):.2f}",
                      f"{r['brute_ms'] / prev['brute_ms']:.2f}"]
        cells = [f"2^{r['exponent']}", r["side"], r["placement"], f"{r['product_ms']:.3f}", f"{r['brute_ms']:.3f}",
                 f"{r['ratio']:.1f}", str(r["identical_topk"]).lower(), *growth, f"{r['empty_count_ms']:.3f}",
                 f"{r['product_peak_bytes'] / MIB:.2f}", f"{r['brute_peak_bytes'] / MIB:.2f}"]
        print("".join(f"{c:>{width}}" for c, (_, width) in zip(cells, columns)))
        prev = r


def exponents(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(not 1 <= v <= 30 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated exponents between 1 and 30, got {text!r}")
    return values


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=exponents, default=[16, 18, 20, 22],
                        help="Bank sizes as exponents of 2, comma-separated (default 16,18,20,22).")
    parser.add_argument("--queries", type=int, default=256, help="Queries per batch.")
    parser.add_argument("--key_dim", type=int, default=128, help="Key width (even).")
    parser.add_argument("--top_k", type=int, default=4, help="Entries returned per query.")
    parser.add_argument("--candidates", type=int, default=8, help="Rows and columns the product keys combine.")
    parser.add_argument("--placement_size", type=int, default=20,
                        help="Exponent of the bank place_entries is timed on (0 skips); banks up to this size "
                             "use the content placement, larger ones random cells.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per path (median reported).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both paths (default 1; 0: torch's default, all cores).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Small sizes (2^10, 2^12, placement at 2^12).")
    parser.add_argument("--json", action="store_true", help="End with one JSON line of the results.")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.placement_size = [10, 12], 12
    if args.key_dim < 2 or args.key_dim % 2 or args.queries < 1 or args.repeats < 1 or args.top_k < 1:
        parser.error("--key_dim must be even and positive; --queries, --repeats and --top_k at least 1")
    if not 0 <= args.placement_size <= 30 or any(2 ** e < args.top_k for e in args.sizes):
        parser.error("--placement_size must be 0..30 and every bank must hold at least --top_k entries")

    import torch

    from lib.memory.modules import MemoryGate
    from lib.memory.placement import place_entries

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    gate = MemoryGate(args.key_dim, key_dim=args.key_dim, top_k=args.top_k, candidates=args.candidates)
    queries = unit_rows(args.queries, args.key_dim, torch.Generator().manual_seed(args.seed))
    rows = []
    with torch.inference_mode():
        for exponent in sorted(args.sizes):
            rows.append(measure_size(exponent, args, gate, queries))
            r = rows[-1]
            print(f"  N = 2^{exponent}: product {r['product_ms']:.3f} ms, brute force {r['brute_ms']:.3f} ms "
                  f"({r['ratio']:.1f}x), identical top-k {str(r['identical_topk']).lower()}, cells: "
                  + (f"content placement in {r['placement_s']:.2f} s" if r["placement_s"] is not None
                     else "random permutation"), flush=True)
        placement = None
        if args.placement_size:
            timed = next((r for r in rows if r["exponent"] == args.placement_size), None)
            if timed is None:  # not one of the lookup banks: time it on a bank of its own
                keys = unit_rows(2 ** args.placement_size, args.key_dim, torch.Generator().manual_seed(args.seed))
                start = time.perf_counter()
                place_entries(keys, seed=args.seed)
                seconds = round(time.perf_counter() - start, 3)
            else:
                seconds = timed["placement_s"]
            placement = {"exponent": args.placement_size, "n": 2 ** args.placement_size, "seconds": seconds}

    for i, r in enumerate(rows):
        prev = rows[i - 1] if i else None
        r["product_growth"] = round(r["product_ms"] / prev["product_ms"], 3) if prev else None
        r["sqrt_n_growth"] = round(math.sqrt(r["n"] / prev["n"]), 3) if prev else None
        r["brute_growth"] = round(r["brute_ms"] / prev["brute_ms"], 3) if prev else None
    summary = {
        "queries": args.queries, "key_dim": args.key_dim, "top_k": args.top_k, "candidates": args.candidates,
        "repeats": args.repeats, "seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "identical_topk": all(r["identical_topk"] for r in rows),
        "product_growth_exponent": growth_exponent(rows, "product_ms"),
        "brute_growth_exponent": growth_exponent(rows, "brute_ms"),
        "placement": placement, "memory": "torch profiler: peak of live allocations during one query batch",
        "sizes": rows, "total_s": round(time.perf_counter() - started, 1),
    }

    print_table(rows)
    print(f"times are per batch of {args.queries} queries (median of {args.repeats}), {summary['threads']} torch "
          f"threads, {summary['cpu_count']} CPUs, torch {torch.__version__}; 'random cells': a random permutation of "
          "the cells instead of the content placement (the lookup's result and cost are the same); 'xprev': growth "
          "over the previous size; empty-count ms: MemoryGate.lookup's count of the grid's empty cells alone, a part "
          "of the product time that grows like N)")
    print(f"growth exponent of time in N (0.5 = sqrt(N), 1 = N): product {summary['product_growth_exponent']}, "
          f"brute force {summary['brute_growth_exponent']}")
    if placement:
        print(f"place_entries at N = 2^{placement['exponent']} (content placement, one run): "
              f"{placement['seconds']:.2f} s")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
