#!/usr/bin/env python
"""Stage 1 of data selection: train only the MoE routers so that routing separates good data from garbage.

Everything but the router weights is frozen. Each layer's experts are split into quality experts and a
garbage bin; the loss is the LM loss on good rows + a routing loss (garbage rows onto the garbage bin, good
rows off it) + load balancing. Every epoch a checkpoint holds the trained routers (trainable.safetensors),
router_config.json (base model, upcycling, expert split) and the optimizer state; select_data.py rebuilds the
model from them. --save_full_model also writes a complete transformers checkpoint at the end.

Single process, upcycling the builtin dense model into an 8-expert MoE:
    python train_router.py --model_name_or_path builtin:smollm2-135m-instruct --upcycle_experts 8 --upcycle_top_k 2 \
        --train_file data/pool.jsonl --text_field text --label_field label \
        --garbage_expert_ratio 0.25 --output_dir outputs/router --num_train_epochs 2 --per_device_train_batch_size 8

From a recipe (command-line flags override it):
    python train_router.py recipes/train_router_smollm2.yaml --output_dir outputs/router

Data-parallel on 2 processes (GPUs, or CPU with gloo):
    torchrun --nproc_per_node 2 train_router.py recipes/train_router_smollm2.yaml

DeepSpeed ZeRO-2 / ZeRO-3 (an MoE checkpoint from the hub, no upcycling):
    deepspeed --num_gpus 2 train_router.py --model_name_or_path Qwen/Qwen3-30B-A3B --train_file pool.jsonl \
        --label_field label --output_dir outputs/router --bf16 --deepspeed ds_configs/zero3.json

Explicit memory, stage 1 (only the MemoryGate trains; see lib/memory/stages.py):
    python train_router.py recipes/memory/train_gate_smollm2.yaml
    python train_router.py --router_type memory_gate --model_name_or_path builtin:smollm2-135m-instruct \
        --memory_bank data/facts/bank.jsonl --train_file data/facts/qa_train.jsonl \
        --validation_file data/facts/qa_validation.jsonl --output_dir outputs/memory/gate

Multi-node: `torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 train_router.py ...` or
`deepspeed --hostfile hostfile train_router.py ...`. Resume: add `--resume_from_checkpoint outputs/router/checkpoint-N`
(or `--resume_from_checkpoint true` for the latest one in --output_dir).
"""


def main(argv=None) -> str | dict:
    import logging
    import os
    import sys

    from lib.core.args import peek_setting

    argv = list(sys.argv[1:] if argv is None else argv)
    if peek_setting(argv, "router_type") == "memory_gate":
        from lib.memory.args import GateStageArguments
        from lib.memory.stages import run_stage

        return run_stage("gate", argv, extra_arguments=(GateStageArguments,))

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
    from lib.core.data import PadCollator
    from lib.core.errors import UserError
    from lib.core.freezing import freeze_all_but
    from lib.core.hub import check_push_to_hub
    from lib.core.training_args import check_eval_data, prepare_output_dir
    from lib.models.args import ModelArguments
    from lib.models.deepspeed import prepare_moe_for_zero3
    from lib.models.loading import load_model_and_tokenizer
    from lib.models.moe import ROUTERS, check_uniform_routers, keep_routers_fp32
    from lib.selection.args import RouterDataArguments, RouterTrainingArguments
    from lib.selection.checkpoint import weights_fingerprint
    from lib.selection.data import prepare_router_datasets, row_end_token
    from lib.selection.split import ExpertSplit
    from lib.selection.trainer import RouterTrainer, router_metrics

    # ---- arguments: everything that can be wrong is refused before a model loads -------------------------
    model_args, data_args, args = parse_args((ModelArguments, RouterDataArguments, RouterTrainingArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    schedules = parse_schedules(args.schedule)
    user_callbacks = load_user_callbacks(args.callbacks)
    check_push_to_hub(args.push_to_hub, args.hub_model_id)
    check_eval_data(args, bool(data_args.validation_file or data_args.validation_split_percentage))
    resume = prepare_output_dir(args)
    set_seed(args.seed)

    # ---- model -------------------------------------------------------------------------------------
    model, tokenizer = load_model_and_tokenizer(model_args, args)
    routers = ROUTERS.get(args.router_type)(model)
    if not routers:
        raise UserError(
            f"{model_args.model_name_or_path} is not an MoE model (no router found); load an MoE checkpoint "
            "or pass --upcycle_experts N to turn this dense model into one."
        )
    check_uniform_routers(routers)

    # ---- freeze everything but the routers (fp32) --------------------------------------------------
    freeze_all_but(model, module_names=[r.name for r in routers])
    if args.deepspeed:
        # Under DeepSpeed mixed precision the optimizer keeps fp32 master weights of the routers.
        prepare_moe_for_zero3(model)
    else:
        keep_routers_fp32(routers)

    # ---- data --------------------------------------------------------------------------------------
    train_ds, eval_ds, data_summary = prepare_router_datasets(
        data_args, tokenizer, seed=args.seed, main_process_first=args.main_process_first)
    if args.process_index == 0:
        print(f"data: {data_summary}", flush=True)

    # ---- trainer: what select_data.py needs to rebuild the model goes into router_config.json -----------
    split = ExpertSplit.by_index(routers, args.garbage_expert_ratio) if args.garbage_selection == "index" else None
    upcycle = ({"num_experts": model_args.upcycle_experts, "top_k": model_args.upcycle_top_k,
                "noise": model_args.upcycle_noise, "seed": model_args.upcycle_seed}
               if model_args.upcycle_experts else None)
    config_extra = {
        "base_model": model_args.model_name_or_path,
        "base_model_revision": model_args.model_revision,
        "base_model_fingerprint": weights_fingerprint(model_args.model_name_or_path, model_args.model_revision),
        "upcycle": upcycle,
        "scoring": {"default_score": "quality_score", "max_seq_length": data_args.max_seq_length,
                    "text_field": data_args.text_field, "messages_field": data_args.messages_field,
                    "score_tokens": data_args.score_tokens,
                    "append_eos": row_end_token(data_args, tokenizer) is not None},
    }
    trainer = RouterTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        compute_metrics=router_metrics if eval_ds is not None else None,
        routers=routers, split=split, probe_dataset=train_ds if split is None else None,
        router_config_extra=config_extra,
    )
    if schedules:
        trainer.add_callback(ScheduleCallback(schedules, trainer.coefs))
    for callback in [SafeCallback(MetricsFileCallback()), *user_callbacks]:
        trainer.add_callback(callback)

    # ---- train, save, evaluate ---------------------------------------------------------------------
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if args.save_full_model:
        trainer.save_full_model(args.output_dir)
    trainer.save_state()
    trainer.log_metrics("train", result.metrics)
    auroc = None
    if eval_ds is not None:
        # Reuse the evaluation of the final step when the schedule already ran one; evaluate otherwise.
        last = [h for h in trainer.state.log_history
                if "eval_router/auroc" in h and h.get("step") == trainer.state.global_step]
        metrics = last[-1] if last else trainer.evaluate()
        trainer.log_metrics("eval", {k: v for k, v in metrics.items() if k.startswith("eval_")})
        auroc = metrics.get("eval_router/auroc")
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="train_router.py: trained MoE routers")
    if trainer.is_world_process_zero():
        if auroc is not None:
            print(f"held-out AUROC of the router quality score: {auroc:.4f}", flush=True)
        print(f"router checkpoint: {os.path.abspath(args.output_dir)}", flush=True)
    return args.output_dir


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
