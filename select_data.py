"""Stage 2: score every row of a data pool with trained MoE routers and keep the best ones.

Single process (CPU or one GPU):
    python select_data.py --router_model outputs/router --data_file data/pool.jsonl --text_field text \
        --output_dir outputs/selected --select_ratio 0.3 --output_format jsonl

Several processes (each scores every N-th shard; rank 0 merges them into the same files one process writes):
    torchrun --nproc_per_node 4 select_data.py --router_model outputs/router --data_file data/pool.jsonl \
        --output_dir outputs/selected --select_ratio 0.3

Chat rows, a different score, a fixed count or a threshold:
    python select_data.py --router_model outputs/router --data_file chats.parquet --messages_field messages \
        --output_dir outputs/selected --score quality_logodds --select_top_k 10000

Baselines through the same machinery (any causal LM; ifd needs chat rows):
    python select_data.py --router_model builtin:smollm2-135m-instruct --data_file pool.jsonl --score perplexity \
        --output_dir outputs/ppl
    python select_data.py --router_model builtin:smollm2-135m-instruct --data_file chats.jsonl \
        --messages_field messages --score ifd --output_dir outputs/ifd

An interrupted run continues from the shards it finished: rerun the same command with --resume.
Outputs: scored.{jsonl,parquet} (every row, all its fields, plus scores), selected.{jsonl,parquet} (best first),
summary.json and scores.png.
"""


def main(argv=None) -> dict:
    import logging

    import transformers

    from lib.args import parse_args
    from lib.selection import SelectArguments, run_selection

    # ---- arguments ---------------------------------------------------------------------------------
    (args,) = parse_args((SelectArguments,), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()

    # ---- score, select, write ----------------------------------------------------------------------
    summary = run_selection(args)

    # ---- report (rank 0) ---------------------------------------------------------------------------
    if summary:
        counts, sel = summary["counts"], summary["selection"]
        cut = sel["cut_selection_score"]
        print(f"scored {counts['scored']} of {counts['rows']} rows ({counts['unscored']} without a score, "
              f"{counts['truncated']} truncated) at {summary['timing']['rows_per_second_rank0']} rows/s; "
              f"kept {counts['selected']} by {sel['score']}" + (f" (cut {cut:.4f})" if cut is not None else ""),
              flush=True)
        print(f"selected rows: {args.output_dir}/{summary['files']['selected']}", flush=True)
    return summary


if __name__ == "__main__":
    from lib.errors import run_main

    run_main(main)
