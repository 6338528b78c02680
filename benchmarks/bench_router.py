#!/usr/bin/env python
"""Router-only training vs full fine-tuning: step time and peak memory on the same upcycled model and data.

Each mode runs in its own fresh process (so peak memory is its own) doing the same training step as
train_router.py: forward with router capture, LM + routing + load-balancing loss, backward, AdamW step.
Router-only freezes everything but the routers; full fine-tuning trains every parameter.

    python benchmarks/bench_router.py                       # builtin SmolLM2 upcycled to 8 experts, top-2
    python benchmarks/bench_router.py --model builtin:tiny-llama --steps 3 --json

Peak memory is the GPU's max allocated memory on CUDA, and on CPU the process's peak resident set size
above what it held once the model was loaded (weights are shared by both modes, training state is not).
With --json the last line printed is a JSON object with step_time_ratio and peak_memory_ratio
(router-only over full).
"""

import argparse
import json
import os
import subprocess
import sys


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    import statistics
    import time

    import torch

    from lib.core.freezing import freeze_all_but
    from lib.models.loading import load_model, load_tokenizer
    from lib.models.moe import RouterCapture, find_moe_routers
    from lib.models.upcycling import upcycle_to_moe
    from lib.selection.losses import causal_lm_loss, load_balancing_loss, routing_loss
    from lib.selection.pools import pydoc_paragraphs
    from lib.selection.split import ExpertSplit

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    if args.upcycle_experts:
        model = upcycle_to_moe(model, args.upcycle_experts, args.top_k)
    model.to(device).train()
    routers = find_moe_routers(model)
    split = ExpertSplit.by_index(routers, 0.25)
    if args.mode == "router":
        freeze_all_but(model, module_names=[r.name for r in routers], verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    texts = pydoc_paragraphs(min_chars=400, max_chars=4000)[: args.batch_size]
    batch = tokenizer(texts, truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[args.batch_size // 2:] = -100  # the second half of the batch plays the garbage rows
    is_garbage = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    is_garbage[args.batch_size // 2:] = True
    token_mask = batch["attention_mask"].reshape(-1).bool()
    masks = split.masks(device)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with RouterCapture(routers) as cap:
            out = model(**batch, use_cache=False)
        loss = (causal_lm_loss(out.logits, labels)
                + routing_loss(cap.logits, masks, is_garbage.reshape(-1), token_mask)
                + 0.01 * load_balancing_loss(cap.logits, split.top_k, token_mask))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out, loss, cap
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    n_total = sum(p.numel() for p in model.parameters())
    return {
        "mode": args.mode, "device": device, "step_time_s": statistics.median(times),
        "peak_memory_bytes": peak, "training_memory_bytes": max(0, peak - base_mem),
        "trainable_params": sum(p.numel() for p in params), "total_params": n_total,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Dense model to upcycle (or an MoE).")
    parser.add_argument("--upcycle_experts", type=int, default=8, help="Experts after upcycling (0: model is MoE).")
    parser.add_argument("--top_k", type=int, default=2, help="Experts per token.")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per step.")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per row.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per mode (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--json", action="store_true", help="End with one JSON line of the results.")
    parser.add_argument("--mode", choices=["router", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.mode:  # worker process
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return {}

    results = {}
    for mode in ("router", "full"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--model", args.model,
               "--upcycle_experts", str(args.upcycle_experts), "--top_k", str(args.top_k),
               "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"benchmark worker '{mode}' failed (exit {proc.returncode})")
        results[mode] = json.loads(line[len("RESULT "):])

    r, f = results["router"], results["full"]
    gib = 1024 ** 3
    summary = {
        "model": args.model, "upcycle_experts": args.upcycle_experts, "top_k": args.top_k,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "device": r["device"],
        "router_step_time_s": round(r["step_time_s"], 4), "full_step_time_s": round(f["step_time_s"], 4),
        "step_time_ratio": round(r["step_time_s"] / f["step_time_s"], 4),
        "router_peak_memory_gib": round(r["peak_memory_bytes"] / gib, 3),
        "full_peak_memory_gib": round(f["peak_memory_bytes"] / gib, 3),
        "peak_memory_ratio": round(r["peak_memory_bytes"] / f["peak_memory_bytes"], 4),
        "training_memory_ratio": round(r["training_memory_bytes"] / max(1, f["training_memory_bytes"]), 4),
        "router_trainable_params": r["trainable_params"], "total_params": r["total_params"],
    }
    print(f"{'':24}{'router-only':>14}{'full FT':>14}{'ratio':>10}")
    print(f"{'step time (s)':24}{r['step_time_s']:>14.3f}{f['step_time_s']:>14.3f}{summary['step_time_ratio']:>10.3f}")
    print(f"{'peak memory (GiB)':24}{r['peak_memory_bytes'] / gib:>14.3f}{f['peak_memory_bytes'] / gib:>14.3f}"
          f"{summary['peak_memory_ratio']:>10.3f}")
    print(f"{'training memory (GiB)':24}{r['training_memory_bytes'] / gib:>14.3f}{f['training_memory_bytes'] / gib:>14.3f}"
          f"{summary['training_memory_ratio']:>10.3f}")
    print(f"trainable parameters: {r['trainable_params']:,} router-only vs {f['trainable_params']:,} full")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
