r"""Pretrain the tool/resource encoder: frozen LLM semantics per tool, resource facts through a gate that starts shut.

    python pretrain_encoder.py --model_name_or_path builtin:smollm2-135m-instruct \
        --tools_file recipes/tools/tools.json --train_file recipes/tools/train_queries.jsonl \
        --validation_file recipes/tools/heldout_queries.jsonl --output_dir outputs/encoder \
        --num_train_epochs 20 --report_to tensorboard

    python pretrain_encoder.py recipes/pretrain_encoder_smollm2.yaml
    torchrun --nproc_per_node 2 pretrain_encoder.py recipes/pretrain_encoder_smollm2.yaml
    deepspeed --num_gpus 2 pretrain_encoder.py recipes/pretrain_encoder_smollm2.yaml --deepspeed ds_configs/zero2.json

The LLM runs once per tool (its name and description, pooled) and once per query, before training; both tables
are cached on disk keyed by the model weights' content and the texts, so a rerun skips those forward passes. Training then touches
only the resource MLP and the gated fusion. Tools that do the same job share a "group" in tools.json; each query
is also contrasted with the other tools of its tool's group (--group_loss_coef), the hard negatives where only
resources decide. Logs gate/alpha every step (also in the progress bar), loss/tool, loss/resource, loss/group,
train/tool_acc, and held-out top-1/top-3 accuracy split into semantic and resource queries, at
step 0 (--eval_on_start) and after every epoch. --resume_from_checkpoint works.
"""


def main(argv=None) -> dict:
    import logging
    import os

    import datasets
    import torch
    import transformers
    from transformers import set_seed

    from lib.core.args import parse_args
    from lib.core.cache import cached_tensor
    from lib.core.callbacks import (
        MetricsFileCallback,
        SafeCallback,
        load_user_callbacks,
    )
    from lib.core.files import write_json, write_jsonl
    from lib.core.hub import check_push_to_hub
    from lib.core.training_args import check_eval_data, prepare_output_dir
    from lib.models.args import ModelArguments
    from lib.models.deepspeed import zero3_init_disabled
    from lib.models.loading import load_model_and_tokenizer, weights_fingerprint
    from lib.tools.args import EncoderDataArguments, EncoderTrainingArguments
    from lib.tools.data import load_tool_queries, load_tools, resource_matrix, tool_groups
    from lib.tools.embeddings import MAX_LENGTH, embed_texts, embeddings_cache_key, prompted
    from lib.tools.losses import balanced_tool_weights
    from lib.tools.modules import QueryAdaptedEncoder, ToolEncoder
    from lib.tools.trainer import EncoderTrainer, GateInProgressBar, encoder_metrics

    # ---- arguments and data: everything that can be wrong is refused before a model loads ---------------
    model_args, data_args, args = parse_args((ModelArguments, EncoderDataArguments, EncoderTrainingArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    user_callbacks = load_user_callbacks(args.callbacks)
    check_push_to_hub(args.push_to_hub, args.hub_model_id)
    check_eval_data(args, bool(data_args.validation_file))
    tools = load_tools(data_args.tools_file)
    names = [t.name for t in tools]
    train_q, train_t, train_r = load_tool_queries(data_args.train_file, names)
    eval_q = load_tool_queries(data_args.validation_file, names) if data_args.validation_file else None
    resume = prepare_output_dir(args)

    # ---- frozen LLM embeddings, cached by the weights' content -------------------------------------
    texts = [t.text() for t in tools]
    queries = train_q + (eval_q[0] if eval_q else [])
    llm = {}

    def model_and_tokenizer():
        if not llm:
            with zero3_init_disabled(args):
                model, tok = load_model_and_tokenizer(model_args, args)
            llm["model"], llm["tok"] = model.eval(), tok
        return llm["model"], llm["tok"]

    def encode(items, show):
        model, tok = model_and_tokenizer()
        return embed_texts(model, tok, items, pooling=args.pooling, layer=args.embedding_layer, progress=show)

    with args.main_process_first(desc="frozen LLM embeddings"):
        weights = weights_fingerprint(model_args.model_name_or_path, model_args.model_revision)
        if weights is None:  # a hub model not downloaded yet: loading it downloads it
            model_and_tokenizer()
            weights = weights_fingerprint(model_args.model_name_or_path, model_args.model_revision)
        settings = {"dtype": model_args.dtype, "upcycle": [model_args.upcycle_experts, model_args.upcycle_top_k,
                                                           model_args.upcycle_noise, model_args.upcycle_seed]}
        semantic, hit_tools = cached_tensor(
            "embeddings", embeddings_cache_key(weights, settings, texts, args.pooling, args.embedding_layer),
            lambda: encode(texts, lambda i, _: print(f"semantic embedding {i + 1}/{len(tools)}: {names[i]}",
                                                     flush=True)))
        if not args.query_lora_r:  # with query adapters the queries are encoded while training
            query_emb, hit_queries = cached_tensor(
                "embeddings", embeddings_cache_key(weights, settings, queries, args.pooling, args.embedding_layer),
                lambda: encode(queries, None))
    if not args.query_lora_r:  # the adapted LLM encodes the queries while training
        llm.clear()
    if args.process_index == 0:
        print(f"semantic table {tuple(semantic.shape)} ({'cached' if hit_tools else 'computed'}), " + (
            f"{len(queries)} queries encoded by the LLM with LoRA r={args.query_lora_r}" if args.query_lora_r else
            f"query embeddings {tuple(query_emb.shape)} ({'cached' if hit_queries else 'computed'})"), flush=True)

    # ---- encoder and data --------------------------------------------------------------------------
    set_seed(args.seed)  # the encoder's initial weights depend on the seed alone, cached embeddings or not
    features, resource_keys = resource_matrix(tools)
    encoder = ToolEncoder(semantic, features, d_resource=args.d_resource,
                          num_attention_heads=args.num_attention_heads, dropout=args.dropout)

    model, collator = encoder, None
    if args.query_lora_r:
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorWithPadding

        llm_model, tok = model_and_tokenizer()
        llm_model.requires_grad_(False)
        lora = LoraConfig(r=args.query_lora_r, lora_alpha=args.query_lora_alpha or 2 * args.query_lora_r,
                          target_modules="all-linear", lora_dropout=0.0)
        model = QueryAdaptedEncoder(encoder, get_peft_model(llm_model, lora), pooling=args.pooling,
                                    layer=args.embedding_layer)
        tok.padding_side = "right"  # the pooling reads the last real token of right-padded rows
        collator = DataCollatorWithPadding(tok)

        def query_columns(start, stop):  # prompted query tokens; the adapted LLM embeds them at every step
            enc = tok(prompted(queries[start:stop], args.pooling), truncation=True, max_length=MAX_LENGTH)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    else:
        def query_columns(start, stop):
            return {"query_emb": query_emb[start:stop].tolist()}

    def as_dataset(start, stop, tool, resource):
        return datasets.Dataset.from_dict({**query_columns(start, stop), "tool": tool, "resource": resource})

    n_train = len(train_q)
    train_ds = as_dataset(0, n_train, train_t, train_r)
    eval_ds = as_dataset(n_train, len(queries), eval_q[1], eval_q[2]) if eval_q else None

    # ---- train (held-out accuracy at step 0, i.e. pure semantics, then every epoch) ---------------------
    # tools that do the same job share a "group" in tools.json; a tool without one is a group of its own
    groups = tool_groups(tools)
    group_of = torch.empty(len(tools), dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    trainer = EncoderTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=collator,
                             compute_metrics=encoder_metrics if eval_ds is not None else None,
                             tool_groups=group_of if len(groups) < len(tools) else None,
                             tool_weights=balanced_tool_weights(train_t, len(tools)) if args.balance_tools else None)
    trainer.add_callback(GateInProgressBar(encoder, trainer.callback_handler))
    for callback in [SafeCallback(MetricsFileCallback()), *user_callbacks]:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    final = None
    if eval_ds is not None:
        # Reuse the evaluation of the final step when the schedule already ran one.
        last = [h for h in trainer.state.log_history if "eval_top1" in h and h.get("step") == trainer.state.global_step]
        final = last[-1] if last else trainer.evaluate()
    trainer.save_model(args.output_dir)
    trainer.save_state()
    if eval_ds is not None:  # what each held-out query got, to see which ones fail
        ranked = trainer.predict(eval_ds, metric_key_prefix="eval").predictions.argsort(-1)[:, ::-1][:, :3]
        if trainer.is_world_process_zero():
            write_jsonl(os.path.join(args.output_dir, "heldout_predictions.jsonl"), [
                {"query": q, "tool": names[t], "kind": "resource" if r else "semantic", "correct": bool(top[0] == t),
                 "predicted": names[top[0]], "top3": [names[i] for i in top]}
                for q, t, r, top in zip(*eval_q, ranked.tolist(), strict=True)])

    # ---- report ------------------------------------------------------------------------------------
    step0 = next((h for h in trainer.state.log_history if "eval_top1" in h and h.get("step") == 0), None)
    alphas = [h["gate/alpha"] for h in trainer.state.log_history if "gate/alpha" in h]
    summary = {
        "tools": names, "resource_keys": resource_keys, "model": model_args.model_name_or_path,
        "model_weights": weights, "pooling": args.pooling, "embedding_layer": args.embedding_layer,
        "hidden_size": int(semantic.shape[1]), "groups": {t.name: t.group for t in tools if t.group},
        "group_loss_coef": args.group_loss_coef, "balance_tools": args.balance_tools,
        "query_lora_r": args.query_lora_r,
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
    from lib.core.errors import run_main

    run_main(main)
