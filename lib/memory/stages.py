"""One run of an explicit-memory stage: the body that train_router.py --router_type memory_gate, train_fusion.py,
train_joint.py and train_memory.py --memory_type explicit share (they differ in which parts train and which
losses count; see lib/memory/trainer.py)."""

from __future__ import annotations

STAGES = {
    # stage: (parts that train, previous stages it may continue from, what the model card calls it)
    "gate": (("gate",), ("gate",), "stage 1: MemoryGate"),
    "fusion": (("fusions",), ("gate", "fusion"), "stage 2: fusion"),
    "joint": (("gate", "fusions"), ("gate", "fusion", "joint"), "stage 3: gate + fusion together"),
    "memory": (("gate", "fusions"), ("gate", "fusion", "joint", "memory"), "stage 4: all parts, instruction data"),
}


def run_stage(stage: str, argv=None, extra_arguments: tuple = ()) -> dict:
    """Train one stage; ``extra_arguments`` are dataclasses of the calling script's own selector flags
    (``--router_type``, ``--memory_type``), parsed and checked but otherwise unused."""
    import logging
    import os

    import transformers
    from transformers import set_seed

    from lib.core.args import parse_args
    from lib.core.callbacks import (
        MetricsFileCallback,
        SafeCallback,
        ScheduleCallback,
        load_user_callbacks,
        parse_schedules,
    )
    from lib.core.cards import write_model_card
    from lib.core.data import PadCollator
    from lib.core.errors import UserError
    from lib.core.files import write_json
    from lib.core.hub import check_push_to_hub
    from lib.core.training_args import check_eval_data, prepare_output_dir
    from lib.memory.args import (
        MemoryDataArguments,
        MemoryModelArguments,
        MemoryTrainingArguments,
    )
    from lib.memory.bank import MemoryBank
    from lib.memory.config import MemoryConfig, default_layers
    from lib.memory.data import load_memory_rows, mix_general
    from lib.memory.features import bank_features
    from lib.memory.model import MemoryModel, memory_parts_from
    from lib.memory.trainer import AlphaInProgressBar, MemoryTrainer, RefreshPlacement
    from lib.models.args import ModelArguments
    from lib.models.loading import load_model_and_tokenizer

    trains, continues_from, title = STAGES[stage]
    model_args, data_args, memory_args, args, *_ = parse_args(
        (ModelArguments, MemoryDataArguments, MemoryModelArguments, MemoryTrainingArguments, *extra_arguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    schedules = parse_schedules(args.schedule)
    user_callbacks = load_user_callbacks(args.callbacks)
    check_push_to_hub(args.push_to_hub, args.hub_model_id)
    check_eval_data(args, bool(data_args.validation_file))
    if stage != "gate" and not memory_args.init_from and args.retrieval == "gate":
        raise UserError(f"The {stage} stage reads entries through a trained gate: pass --init_from with the output "
                        "folder of train_router.py --router_type memory_gate (or --retrieval gold).")
    previous = MemoryConfig.load(memory_args.init_from) if memory_args.init_from else None
    if previous is not None and previous.base_model != model_args.model_name_or_path:
        raise UserError(f"--init_from {memory_args.init_from} was trained on {previous.base_model}, not "
                        f"{model_args.model_name_or_path}; pass the same --model_name_or_path.")
    resume = prepare_output_dir(args)
    set_seed(args.seed)

    # ---- backbone (frozen), bank, memory parts -----------------------------------------------------
    backbone, tokenizer = load_model_and_tokenizer(model_args, args)
    backbone.requires_grad_(False)
    backbone.config.use_cache = False
    bank = MemoryBank.load(data_args.memory_bank, tokenizer, max_entry_tokens=data_args.max_entry_tokens,
                           truncate=data_args.truncate_entries)
    if previous is not None:
        memory = memory_parts_from(memory_args.init_from, backbone, stage_check=continues_from)
    else:
        num_layers = backbone.config.num_hidden_layers
        query, fusion = default_layers(num_layers)
        config = MemoryConfig(
            base_model=model_args.model_name_or_path, base_model_revision=model_args.model_revision,
            hidden_size=backbone.config.hidden_size, num_layers=num_layers,
            query_layer=memory_args.query_layer or query, fusion_layers=memory_args.layers() or fusion,
            memory_source=memory_args.memory_source, key_dim=memory_args.key_dim, top_k=memory_args.top_k,
            candidates=memory_args.candidates, max_entry_tokens=data_args.max_entry_tokens)
        memory = MemoryModel(backbone, config)
    memory.memory_config.stage = stage
    memory.memory_config.max_entry_tokens = data_args.max_entry_tokens
    for part in ("gate", "fusions"):
        getattr(memory, part).requires_grad_(part in trains)
    memory.retrieval = args.retrieval if stage != "gate" else "gate"
    memory.set_bank(bank, bank_features(model_args, args, memory, bank))

    # ---- data --------------------------------------------------------------------------------------
    needs_gold = memory.retrieval == "gold"
    train_ds = load_memory_rows(data_args.train_file, tokenizer, bank, max_length=data_args.max_length,
                                require_memory_id=needs_gold, limit=data_args.max_train_rows, seed=args.seed)
    if data_args.general_file and data_args.general_mix_ratio > 0:
        general = load_memory_rows(data_args.general_file, tokenizer, None, max_length=data_args.max_length,
                                   require_memory_id=False)
        train_ds = mix_general(train_ds, general, data_args.general_mix_ratio, args.seed)
    eval_ds = (load_memory_rows(data_args.validation_file, tokenizer, bank, max_length=data_args.max_length,
                                require_memory_id=needs_gold, limit=data_args.max_eval_rows, seed=args.seed)
               if data_args.validation_file else None)
    if args.process_index == 0:
        print(f"bank: {len(bank)} entries from {bank.source}; train rows {len(train_ds)}"
              + (f", held-out rows {len(eval_ds)}" if eval_ds is not None else "")
              + f"; query layer {memory.memory_config.query_layer}, fusion layers "
              f"{memory.memory_config.fusion_layers}", flush=True)

    # ---- trainer -----------------------------------------------------------------------------------
    def save_files(output_dir: str) -> None:
        memory.memory_config.bank_size = len(bank)
        memory.memory_config.bank_fingerprint = bank.fingerprint()
        memory.memory_config.save(output_dir)
        bank.save(output_dir)
        cfg = memory.memory_config
        write_model_card(output_dir, title=f"Explicit memory for {cfg.base_model} ({title})", lines=[
            (f"Memory parts (MemoryGate, fusion at layers {cfg.fusion_layers}, MemoryNorm) trained by the "
             f"**{stage}** stage for the frozen `{cfg.base_model}`; the backbone's weights are not included."),
            "",
            (f"- bank: {len(bank)} entries (`memory_bank.jsonl`, fingerprint `{bank.fingerprint()}`), from "
             f"`{bank.source}`; edit it or pass another bank at evaluation time"),
            (f"- query layer {cfg.query_layer}, key_dim {cfg.key_dim}, top_k {cfg.top_k}, memory source "
             f"{cfg.memory_source}"),
            f"- trained parts: {', '.join(trains)}; retrieval while training: {memory.retrieval}",
            "",
            ("Load with `lib.memory.model.load_memory_model(folder)`; measure with `evaluate.py --memory_model "
             "folder --qa_file qa.jsonl`."),
        ], library_name="transformers", tags=["explicit-memory", f"memory-{stage}"], base_model=cfg.base_model)

    query_rows = None
    if stage == "gate" and args.query_cache_gb > 0:
        rows = list(train_ds["input_ids"]) + (list(eval_ds["input_ids"]) if eval_ds is not None else [])
        size = sum(map(len, rows)) * backbone.config.hidden_size * next(backbone.parameters()).element_size()
        if size <= args.query_cache_gb * 2**30:
            query_rows = rows  # their states are computed at the first step (under ZeRO-3 only then can it run)
        elif args.process_index == 0:
            print(f"query-layer states of {len(rows)} rows would take {size / 2**30:.1f} GB, over --query_cache_gb "
                  f"{args.query_cache_gb}: the backbone runs at every step", flush=True)
    trainer = MemoryTrainer(model=memory, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                            stage=stage, save_files=save_files, query_rows=query_rows)
    if schedules:
        trainer.add_callback(ScheduleCallback(schedules, trainer.coefs))
    if "gate" in trains:
        trainer.add_callback(RefreshPlacement(memory, args.placement_refresh_steps))
    if stage != "gate":
        trainer.add_callback(AlphaInProgressBar(memory, trainer.callback_handler))
    for callback in [SafeCallback(MetricsFileCallback()), *user_callbacks]:
        trainer.add_callback(callback)

    # ---- train, save, report -----------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=resume)
    memory.refresh_placement()
    trainer.save_model(args.output_dir)
    trainer.save_state()
    final = {}
    if eval_ds is not None:
        last = [h for h in trainer.state.log_history if h.get("step") == trainer.state.global_step
                and any(k.startswith("eval_") for k in h)]
        final = last[-1] if last else trainer.evaluate()
    alphas = {layer: [h[f"fusion/alpha/{layer}"] for h in trainer.state.log_history
                      if f"fusion/alpha/{layer}" in h] for layer in memory.fusions}
    summary = {"stage": stage, "bank_size": len(bank), "train_rows": len(train_ds), "final": final,
               "alpha": {layer: {"first": v[0], "last": v[-1]} for layer, v in alphas.items() if v}}
    if args.push_to_hub:
        trainer.push_to_hub(commit_message=f"explicit memory, {title}")
    if trainer.is_world_process_zero():
        write_json(os.path.join(args.output_dir, "memory_summary.json"), summary)
        shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("eval_gate/", "eval_loss"))}
        if shown:
            print(f"held-out: {shown}", flush=True)
        for layer, v in summary["alpha"].items():
            print(f"fusion layer {layer}: tanh(alpha) {v['first']:.4f} -> {v['last']:.4f}", flush=True)
        print(f"memory parts ({stage}): {os.path.abspath(args.output_dir)}", flush=True)
    return summary
