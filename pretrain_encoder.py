"""Pretrain the tool/resource encoder: frozen LLM semantics per tool, resource facts through a gate that starts shut.

    python pretrain_encoder.py --model_name_or_path builtin:smollm2-135m-instruct \
        --tools_file recipes/tools/tools.json --train_file recipes/tools/train_queries.jsonl \
        --validation_file recipes/tools/heldout_queries.jsonl --output_dir outputs/encoder \
        --num_train_epochs 20 --report_to tensorboard

    python pretrain_encoder.py recipes/pretrain_encoder_smollm2.yaml
    torchrun --nproc_per_node 2 pretrain_encoder.py recipes/pretrain_encoder_smollm2.yaml
    deepspeed --num_gpus 2 pretrain_encoder.py recipes/pretrain_encoder_smollm2.yaml --deepspeed ds_configs/zero2.json

The LLM runs once per tool (its name and description, pooled) and once per query, before training; both tables
are cached on disk keyed by the model and the texts, so a rerun skips those forward passes. Training then touches
only the resource MLP and the gated fusion. Logs gate/alpha every step (also in the progress bar), loss/tool,
loss/resource, train/tool_acc, and held-out top-1/top-3 accuracy split into semantic and resource queries, at
step 0 and after every epoch. --resume_from_checkpoint works.
"""


def main(argv=None) -> dict:
    import logging
    import os

    import datasets
    import transformers
    from transformers import set_seed

    from lib.args import EncoderDataArguments, ModelArguments, parse_args, resume_argument
    from lib.callbacks import MetricsFileCallback, SafeCallback
    from lib.data import load_tool_queries
    from lib.files import write_json
    from lib.models.encoder import (
        ToolEncoder,
        cached_embeddings,
        embed_texts,
        embeddings_cache_key,
        load_tools,
        resource_matrix,
    )
    from lib.trainers.encoder import (
        EncoderTrainer,
        EncoderTrainingArguments,
        GateInProgressBar,
        Step0Evaluation,
        encoder_metrics,
        evaluate_tool_encoder,
    )

    # ---- arguments ---------------------------------------------------------------------------------
    model_args, data_args, args = parse_args((ModelArguments, EncoderDataArguments, EncoderTrainingArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(args.seed)
    tools = load_tools(data_args.tools_file)
    names = [t.name for t in tools]
    train_q, train_t, train_r = load_tool_queries(data_args.train_file, names)
    eval_q = load_tool_queries(data_args.validation_file, names) if data_args.validation_file else None

    # ---- frozen LLM embeddings (cached) ------------------------------------------------------------
    texts = [t.text() for t in tools]
    queries = train_q + (eval_q[0] if eval_q else [])
    llm = {}

    def model_and_tokenizer():
        if not llm:
            from lib.models.loading import load_model_and_tokenizer, zero3_init_disabled

            with zero3_init_disabled():
                model, tok = load_model_and_tokenizer(model_args)
            llm["model"], llm["tok"] = model.eval(), tok
        return llm["model"], llm["tok"]

    def config_dict():
        from transformers import AutoConfig

        from lib.models.loading import resolve_model_path

        return AutoConfig.from_pretrained(resolve_model_path(model_args.model_name_or_path),
                                          revision=model_args.model_revision).to_dict()

    def encode(items, show):
        model, tok = model_and_tokenizer()
        return embed_texts(model, tok, items, pooling=args.pooling, progress=show)

    with args.main_process_first(desc="frozen LLM embeddings"):
        cfg = config_dict()
        model_id = f"{model_args.model_name_or_path}@{model_args.model_revision}"
        semantic, hit_tools = cached_embeddings(
            embeddings_cache_key(model_id, cfg, texts, args.pooling),
            lambda: encode(texts, lambda i, _: print(f"semantic embedding {i + 1}/{len(tools)}: {names[i]}",
                                                     flush=True)))
        query_emb, hit_queries = cached_embeddings(embeddings_cache_key(model_id, cfg, queries, args.pooling),
                                                   lambda: encode(queries, None))
    llm.clear()
    if args.process_index == 0:
        print(f"semantic table {tuple(semantic.shape)} ({'cached' if hit_tools else 'computed'}), query embeddings "
              f"{tuple(query_emb.shape)} ({'cached' if hit_queries else 'computed'})", flush=True)

    # ---- encoder and data --------------------------------------------------------------------------
    features, resource_keys = resource_matrix(tools)
    encoder = ToolEncoder(semantic, features, d_resource=args.d_resource,
                          num_attention_heads=args.num_attention_heads, dropout=args.dropout)

    def as_dataset(emb, tool, resource):
        return datasets.Dataset.from_dict({"query_emb": emb.tolist(), "tool": tool, "resource": resource})

    n_train = len(train_q)
    train_ds = as_dataset(query_emb[:n_train], train_t, train_r)
    eval_ds = as_dataset(query_emb[n_train:], eval_q[1], eval_q[2]) if eval_q else None

    # ---- train -------------------------------------------------------------------------------------
    trainer = EncoderTrainer(model=encoder, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             compute_metrics=encoder_metrics if eval_ds is not None else None)
    trainer.add_callback(GateInProgressBar(encoder, trainer.callback_handler))
    trainer.add_callback(SafeCallback(MetricsFileCallback()))
    resume = resume_argument(args.resume_from_checkpoint)
    step0 = evaluate_tool_encoder(encoder, eval_ds, args.temperature) if eval_ds is not None else None
    if step0 and not resume:
        trainer.add_callback(Step0Evaluation(trainer, step0))
    trainer.train(resume_from_checkpoint=resume)
    final = None
    if eval_ds is not None:
        # Reuse the evaluation of the final step when the schedule already ran one.
        last = [h for h in trainer.state.log_history if "eval_top1" in h and h.get("step") == trainer.state.global_step]
        final = last[-1] if last else trainer.evaluate()
    trainer.save_model(args.output_dir)
    trainer.save_state()

    # ---- report ------------------------------------------------------------------------------------
    alphas = [h["gate/alpha"] for h in trainer.state.log_history if "gate/alpha" in h]
    summary = {
        "tools": names, "resource_keys": resource_keys, "model": model_args.model_name_or_path,
        "pooling": args.pooling, "hidden_size": int(semantic.shape[1]),
        "d_resource": args.d_resource or int(semantic.shape[1]), "num_attention_heads": args.num_attention_heads,
        "alpha": {"first": alphas[0], "middle": alphas[len(alphas) // 2], "last": alphas[-1]} if alphas else None,
        "step0": step0, "final": final,
    }
    if trainer.is_world_process_zero():
        write_json(os.path.join(args.output_dir, "encoder_config.json"), summary)
        if step0 and final:
            for label, m in (("step 0 (semantic only)", step0), ("after training", final)):
                print(f"{label}: top-1 {m['eval_top1']:.3f} (semantic {m.get('eval_top1_semantic', float('nan')):.3f}, "
                      f"resource {m.get('eval_top1_resource', float('nan')):.3f}), top-3 {m['eval_top3']:.3f}",
                      flush=True)
        if alphas:
            print(f"gate alpha: first {alphas[0]:.4f}, middle {alphas[len(alphas) // 2]:.4f}, last {alphas[-1]:.4f}",
                  flush=True)
        print(f"encoder: {os.path.abspath(args.output_dir)}", flush=True)
    return summary


if __name__ == "__main__":
    from lib.errors import run_main

    run_main(main)
