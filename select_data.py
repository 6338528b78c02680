r"""Stage 2: score every row of a data pool with trained MoE routers and keep the best ones.

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

Supervised baselines trained on labelled rows (train_router.py's --train_file format: text or messages + 0/1 label):
    python select_data.py --router_model builtin:smollm2-135m-instruct --data_file pool.jsonl --score fasttext \
        --baseline_train_file data/labelled.jsonl --output_dir outputs/fasttext
    python select_data.py --router_model builtin:smollm2-135m-instruct --data_file pool.jsonl --score probe \
        --baseline_train_file data/labelled.jsonl --probe_layer 15 --output_dir outputs/probe

An interrupted run continues from the shards it finished: rerun the same command with --resume.
Outputs: scored.{jsonl,parquet} (every row, all its fields, plus scores), selected.{jsonl,parquet} (best first),
scores.png, and summary.json, written last: a folder with a summary.json holds a complete set.
"""


def main(argv=None) -> dict | None:
    import datetime
    import logging
    import math
    import os
    import time

    import torch
    import transformers
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from lib.core.args import parse_args
    from lib.core.data import check_fields, load_rows
    from lib.core.errors import DataError, UserError
    from lib.selection.args import SelectArguments
    from lib.selection.baselines import (
        baseline_settings,
        pooled_features,
        prepare_baseline,
        read_training_rows,
    )
    from lib.selection.checkpoint import load_row_tokenizer, load_scoring_model
    from lib.selection.outputs import write_selection
    from lib.selection.scorer import BatchScorer, HiddenPooler, score_shard
    from lib.selection.scores import BASELINE_SCORES, LM_SCORES, ROUTER_SCORES, SCORES
    from lib.selection.shards import (
        SCORE_COLUMNS,
        SHARD_FORMAT_VERSION,
        check_output_dir,
        data_fingerprint,
        prepare_output_dir,
        shard_path,
        shard_size_for,
        write_shard,
    )
    from lib.selection.split import find_router_config

    # ---- arguments and processes -------------------------------------------------------------------
    (args,) = parse_args((SelectArguments,), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    started = time.time()
    # Ranks wait for each other only at the merge; a long pool on unequal hardware needs patience.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(hours=6))

    # ---- data --------------------------------------------------------------------------------------
    with state.main_process_first():
        ds = load_rows(args.data_file, split=args.split, config_name=args.dataset_config_name)
    if args.max_samples:
        ds = ds.select(range(min(len(ds), args.max_samples)))
    column = args.messages_field or args.text_field
    check_fields(ds, args.data_file, text_field=args.text_field, messages_field=args.messages_field, label_field=None)
    clash = [c for c in ds.column_names if c in SCORE_COLUMNS]
    if clash:
        raise DataError(f"{args.data_file} already has column(s) {clash} that select_data.py writes; rename or drop "
                        "them first (is this an already-scored file?).")
    baseline_rows = None
    if args.score in BASELINE_SCORES:  # labelled rows to train on; every process checks them (one same sentence)
        with state.main_process_first():
            baseline_rows = read_training_rows(args)

    # ---- model: base + upcycling + trained routers (or any causal LM for perplexity / IFD / probe) ----------
    needs = SCORES.get(args.score).needs
    want_router = args.score in ROUTER_SCORES or (
        needs != "text" and find_router_config(args.router_model, args.model_revision) is not None)
    device = state.device
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    with state.main_process_first():
        if needs == "text":  # fastText reads the rendered rows: no model, a tokenizer only for the chat template
            scoring = load_row_tokenizer(args.router_model if args.messages_field else None,
                                         revision=args.model_revision, trust_remote_code=args.trust_remote_code)
        else:
            scoring = load_scoring_model(
                args.router_model, want_router=want_router, dtype=dtype,
                attn_implementation=args.attn_implementation or "sdpa",
                experts_implementation=args.experts_implementation, revision=args.model_revision,
                trust_remote_code=args.trust_remote_code, device=device)
    trained_on = scoring.router_config.get("scoring", {})
    if args.score in BASELINE_SCORES:
        args.score_tokens = "all"
    if args.score_tokens is None and args.score != "ifd":
        args.score_tokens = trained_on.get("score_tokens") or "all"
        if args.score_tokens == "assistant" and not args.messages_field:
            raise UserError(f"{args.router_model} was trained on the assistant turns of chat rows "
                            "(router_config.json); pass --messages_field, or --score_tokens all for text rows.")
    masks = scoring.split.masks(device) if scoring.split else None
    max_len = args.max_seq_length or int(trained_on.get("max_seq_length") or 512)
    # Text rows get the end token the routers were trained with (router_config.json) wherever the routers read them
    # (perplexity runs too, whose router columns then match a router run; the token is no perplexity target).
    # The baselines read rows as they are.
    eos_id = (scoring.tokenizer.eos_token_id if want_router and needs not in ("text", "hidden")
              and not args.messages_field and trained_on.get("append_eos") else None)
    scorer = alone_scorer = probe_layer = None
    if needs == "hidden":
        n_layers = scoring.model.config.get_text_config().num_hidden_layers
        probe_layer = n_layers // 2 if args.probe_layer is None else args.probe_layer
        if probe_layer > n_layers:
            raise UserError(f"--probe_layer {probe_layer} is past the last of {args.router_model}'s {n_layers} layers; "
                            f"choose 0 (embeddings) to {n_layers}.")
        scorer = HiddenPooler(scoring.model, probe_layer)
    elif needs != "text":
        scorer = BatchScorer(scoring.model, routers=scoring.routers, garbage_masks=masks,
                             top_k=scoring.split.top_k if scoring.split else 1, lm=args.score in LM_SCORES,
                             targets_only=args.score_tokens == "assistant")
        alone_scorer = BatchScorer(scoring.model, lm=True) if args.score == "ifd" else None

    # ---- shards: the unit of resuming; every process takes every N-th unfinished one ---------------------
    n_rows = len(ds)
    shard_size = shard_size_for(n_rows, args.shard_size)
    n_shards = math.ceil(n_rows / shard_size)
    shard_dir = os.path.join(args.output_dir, "shards")
    manifest = {
        "format_version": SHARD_FORMAT_VERSION, "score": args.score, "model": scoring.fingerprint,
        "data": data_fingerprint(args.data_file, ds), "rows": n_rows, "shard_size": shard_size,
        "max_seq_length": max_len, "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
        "field": column, "dtype": dtype, "device_type": device.type, "score_tokens": args.score_tokens,
    }
    if eos_id is not None:
        manifest["append_eos"] = True
    if baseline_rows is not None:
        manifest["baseline"] = baseline_settings(args, baseline_rows, probe_layer)
    existing = check_output_dir(args, manifest)
    state.wait_for_everyone()  # every process has checked before the main one changes anything
    if state.is_main_process:
        prepare_output_dir(args, manifest, existing)
    state.wait_for_everyone()
    pending = [s for s in range(n_shards) if not os.path.exists(shard_path(shard_dir, s))]
    state.wait_for_everyone()  # every process has listed the finished shards before anyone writes a new one

    # ---- baseline (fasttext, probe): trained once by the main process, loaded by every process -----------------
    baseline = baseline_info = None
    if baseline_rows is not None:
        run = dict(device=device, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
        baseline, baseline_info = prepare_baseline(
            args, state, baseline_rows, manifest["baseline"], shard_dir, tokenizer=scoring.tokenizer,
            features=lambda items: pooled_features(scorer, items, scoring.tokenizer, chat=bool(args.messages_field),
                                                   max_len=max_len, **run))
    mine = pending[state.process_index::state.num_processes]
    my_rows = sum(min(shard_size, n_rows - s * shard_size) for s in mine)

    # ---- score -------------------------------------------------------------------------------------
    desc = f"scoring ({args.score})" + (f", process 0 of {state.num_processes}" if state.num_processes > 1 else "")
    bar = tqdm(total=my_rows, unit="row", dynamic_ncols=True, desc=desc,
               disable=args.disable_tqdm or not state.is_main_process)
    score_started = time.time()
    for s in mine:
        start = s * shard_size
        values = ds.select(range(start, min(n_rows, start + shard_size)))[column]
        rows = score_shard(values, scorer=scorer, tokenizer=scoring.tokenizer, args=args, max_len=max_len,
                           device=device, want_router=want_router and needs != "hidden", alone_scorer=alone_scorer,
                           baseline=baseline, eos_id=eos_id,
                           on_rows=lambda n, skipped=0: bar.update(n + skipped))
        write_shard(shard_path(shard_dir, s), start, rows)
    bar.close()
    scoring_seconds = time.time() - score_started
    state.wait_for_everyone()

    # ---- merge, select, write the result set (main process; summary.json last) -------------------------
    summary = None
    if state.is_main_process:
        summary = write_selection(
            args, ds, shard_dir=shard_dir, n_shards=n_shards, manifest=manifest, router_cfg=scoring.router_config,
            want_router=want_router, max_len=max_len, dtype=dtype, device=device.type,
            processes=state.num_processes, rows_scored_here=my_rows, scoring_seconds=scoring_seconds, started=started,
            baseline=baseline_info)
        counts, sel = summary["counts"], summary["selection"]
        cut = sel["cut_selection_score"]
        print(f"scored {counts['scored']} of {counts['rows']} rows ({counts['unscored']} without a score, "
              f"{counts['truncated']} truncated) at {summary['timing']['rows_per_second_rank0']} rows/s; "
              f"kept {counts['selected']} by {sel['score']}" + (f" (cut {cut:.4f})" if cut is not None else ""),
              flush=True)
        print(f"selected rows: {args.output_dir}/{summary['files']['selected']}", flush=True)
    state.wait_for_everyone()
    return summary


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
