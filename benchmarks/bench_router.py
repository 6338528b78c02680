#!/usr/bin/env python
"""Router training (local and full gradients) vs full fine-tuning: step time and peak memory, same data.

Four training steps, each mode in its own fresh process (so peak memory is its own), on the same batch:

    router-local     what train_router.py runs with --router_gradient local --lm_loss_coef 0: only the routers
                     train, each detached from the network (RouterCapture(detach=True)), loss = routing +
                     0.01 * load balancing, so backward reaches a router only through its own logits
    router-full      train_router.py's default (--router_gradient full): only the routers train, loss = LM +
                     routing + 0.01 * load balancing, backward through the whole network
    full FT (MoE)    the same loss with every parameter of the upcycled model training
    full FT (dense)  the dense model before upcycling, every parameter training, LM loss only: what an ordinary
                     fine-tuning step of the model costs

All use AdamW. Ratios are printed against both full fine-tunings. For a model that already has routers nothing is
upcycled and the dense reference is skipped.

    python benchmarks/bench_router.py                       # builtin SmolLM2 upcycled to 8 experts, top-2
    python benchmarks/bench_router.py --model builtin:tiny-llama --steps 3 --json

Peak memory is the GPU's max allocated memory on CUDA; on CPU the process's peak resident set size during the
timed steps (Linux's high-water mark, reset once the model, optimizer and batch are ready), so the transient of
loading and upcycling is not counted. Training memory is that peak minus what the process held when the steps
began (the weights). With --json the last line printed is a JSON object: step_time_ratio and peak_memory_ratio
(router-full over full FT of the MoE, as before), the same ratios for every mode against both references under
``modes``, and local_speedup (router-full step time over router-local step time). Step times are wall clock; the
process CPU time of each step is reported next to them (on a shared CPU it moves less when other processes run).
"""

import argparse
import json
import os
import subprocess
import sys

# Run from anywhere: the scripts and lib/ of this checkout come first.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# worker mode: (column title, JSON key prefix); the order they run and are printed in.
MODES = {
    "local": ("router-local", "local"),
    "router": ("router-full", "router"),
    "full": ("full FT (MoE)", "full"),
    "dense": ("full FT (dense)", "dense"),
}
GIB = 1024 ** 3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that a later peak is the training's, not the loading's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # no /proc status line: the lifetime peak is the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    import gc
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
    tokenizer = load_tokenizer(args.model, flag="--model")
    model = load_model(args.model, flag="--model")
    if args.upcycle_experts and args.mode != "dense":
        model = upcycle_to_moe(model, args.upcycle_experts, args.top_k)
    model.to(device).train()
    routers = find_moe_routers(model)
    split = ExpertSplit.by_index(routers, 0.25) if routers else None
    if args.mode in ("local", "router"):
        freeze_all_but(model, module_names=[r.name for r in routers], verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    texts = pydoc_paragraphs(min_chars=400, max_chars=4000)[: args.batch_size]
    batch = tokenizer(texts, truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if args.mode != "dense":  # an ordinary fine-tuning step learns every row; router training has garbage rows
        labels[args.batch_size // 2:] = -100  # the second half of the batch plays the garbage rows
    is_garbage = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    is_garbage[args.batch_size // 2:] = True
    token_mask = batch["attention_mask"].reshape(-1).bool()
    masks = split.masks(device) if split else None

    def loss_of_one_step():
        if args.mode == "dense":
            return causal_lm_loss(model(**batch, use_cache=False).logits, labels)
        local = args.mode == "local"
        with RouterCapture(routers, detach=local) as cap:
            # Without an LM term the LM head runs on the last position only, as RouterTrainer does.
            out = model(**batch, use_cache=False, logits_to_keep=1 if local else 0)
        loss = (routing_loss(cap.logits, masks, is_garbage.reshape(-1), token_mask)
                + 0.01 * load_balancing_loss(cap.logits, split.top_k, token_mask))
        return loss if local else loss + causal_lm_loss(out.logits, labels)

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem, peak_is_training = torch.cuda.memory_allocated(), True
    else:
        base_mem, peak_is_training = _rss_bytes(), _reset_peak_rss()
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_of_one_step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    return {
        "mode": args.mode, "device": device, "step_time_s": statistics.median(times),
        "step_cpu_time_s": statistics.median(cpu_times),
        "peak_memory_bytes": peak, "training_memory_bytes": max(0, peak - base_mem),
        "peak_is_training_only": peak_is_training,
        "trainable_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in model.parameters()),
    }


def run_worker(mode: str, args, upcycle: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--model", args.model,
           "--upcycle_experts", str(upcycle), "--top_k", str(args.top_k), "--batch_size", str(args.batch_size),
           "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"benchmark worker '{mode}' failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def _ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 4) if b else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Dense model to upcycle (or an MoE).")
    parser.add_argument("--upcycle_experts", type=int, default=None,
                        help="Experts to upcycle a dense model to (default 8); a model that already has routers is "
                             "used as it is.")
    parser.add_argument("--top_k", type=int, default=2, help="Experts per token of the upcycled model.")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per step.")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per row.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per mode (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--json", action="store_true", help="End with one JSON line of the results.")
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2 or args.seq_len < 2:
        parser.error("--steps must be at least 1, --warmup at least 0, --batch_size and --seq_len at least 2")

    if args.mode:  # worker process: the parent has already resolved --upcycle_experts
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return {}

    from benchmarks.common import upcycle_experts_for

    upcycle = upcycle_experts_for(args.model, args.upcycle_experts)
    modes = [m for m in MODES if upcycle or m != "dense"]  # an MoE model has no dense version to compare with
    results = {}
    for mode in modes:
        results[mode] = run_worker(mode, args, upcycle)
        print(f"  {MODES[mode][0]:<16} step {results[mode]['step_time_s']:.3f} s, peak memory "
              f"{results[mode]['peak_memory_bytes'] / GIB:.3f} GiB", flush=True)

    full, dense = results["full"], results.get("dense")
    per_mode = {}
    for mode, r in results.items():
        per_mode[MODES[mode][1]] = {
            "step_time_s": round(r["step_time_s"], 4), "step_cpu_time_s": round(r["step_cpu_time_s"], 4),
            "peak_memory_gib": round(r["peak_memory_bytes"] / GIB, 3),
            "training_memory_gib": round(r["training_memory_bytes"] / GIB, 3),
            "trainable_params": r["trainable_params"], "total_params": r["total_params"],
            "step_time_ratio_vs_full": _ratio(r["step_time_s"], full["step_time_s"]),
            "step_cpu_time_ratio_vs_full": _ratio(r["step_cpu_time_s"], full["step_cpu_time_s"]),
            "peak_memory_ratio_vs_full": _ratio(r["peak_memory_bytes"], full["peak_memory_bytes"]),
            "step_time_ratio_vs_dense": _ratio(r["step_time_s"], dense and dense["step_time_s"]),
            "peak_memory_ratio_vs_dense": _ratio(r["peak_memory_bytes"], dense and dense["peak_memory_bytes"]),
        }
    r, loc = results["router"], results["local"]
    summary = {
        "model": args.model, "upcycle_experts": upcycle, "top_k": args.top_k, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "device": r["device"],
        "peak_is_training_only": all(x["peak_is_training_only"] for x in results.values()),
        # Router-full against full fine-tuning of the same MoE model, as this benchmark has always reported.
        "router_step_time_s": per_mode["router"]["step_time_s"], "full_step_time_s": per_mode["full"]["step_time_s"],
        "step_time_ratio": per_mode["router"]["step_time_ratio_vs_full"],
        "router_peak_memory_gib": per_mode["router"]["peak_memory_gib"],
        "full_peak_memory_gib": per_mode["full"]["peak_memory_gib"],
        "peak_memory_ratio": per_mode["router"]["peak_memory_ratio_vs_full"],
        "training_memory_ratio": _ratio(r["training_memory_bytes"], max(1, full["training_memory_bytes"])),
        "router_trainable_params": r["trainable_params"], "total_params": r["total_params"],
        # What --router_gradient local saves over the default.
        "local_speedup": round(r["step_time_s"] / loc["step_time_s"], 4),
        "local_cpu_speedup": round(r["step_cpu_time_s"] / loc["step_cpu_time_s"], 4),
        "local_step_time_ratio": per_mode["local"]["step_time_ratio_vs_full"],
        "local_peak_memory_ratio": per_mode["local"]["peak_memory_ratio_vs_full"],
        "modes": per_mode,
    }

    def cell(value, fmt):
        return f"{'–' if value is None else format(value, fmt):>17}"

    names = list(per_mode)
    print(f"\n{'':26}" + "".join(f"{MODES[m][0]:>17}" for m in results))
    rows = [("step time (s)", "step_time_s", ".3f"), ("  / full FT (MoE)", "step_time_ratio_vs_full", ".3f"),
            ("  / full FT (dense)", "step_time_ratio_vs_dense", ".3f"), ("step CPU time (s)", "step_cpu_time_s", ".3f"),
            ("  / full FT (MoE)", "step_cpu_time_ratio_vs_full", ".3f"), ("peak memory (GiB)", "peak_memory_gib", ".3f"),
            ("  / full FT (MoE)", "peak_memory_ratio_vs_full", ".3f"),
            ("  / full FT (dense)", "peak_memory_ratio_vs_dense", ".3f"),
            ("training memory (GiB)", "training_memory_gib", ".3f"), ("trainable parameters", "trainable_params", ","),
            ("total parameters", "total_params", ",")]
    for title, key, fmt in rows:
        print(f"{title:<26}" + "".join(cell(per_mode[n][key], fmt) for n in names))
    print(f"router-local steps are {summary['local_speedup']:.2f}x as fast as router-full steps "
          f"({summary['local_cpu_speedup']:.2f}x in process CPU time, which other processes on the machine disturb "
          "less); every ratio is measured in this run; peak memory is "
          + ("the peak during the timed steps" if summary["peak_is_training_only"] else "the process's lifetime peak"))
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
