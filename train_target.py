r"""Stage 3: fine-tune the target model (LoRA by default in the recipes) on the rows select_data.py kept.

Single process:
    python train_target.py --model_name_or_path builtin:smollm2-135m-instruct \
        --train_file outputs/selected/selected.jsonl --messages_field messages --output_dir outputs/target \
        --use_peft --lora_r 16 --learning_rate 2e-4 --num_train_epochs 1

From a recipe (flags after it override it):
    python train_target.py recipes/train_target_smollm2.yaml

Data-parallel and DeepSpeed (on CPU-only machines add DS_ACCELERATOR=cpu for deepspeed):
    torchrun --nproc_per_node 2 train_target.py recipes/train_target_smollm2.yaml
    accelerate launch --num_processes 2 train_target.py recipes/train_target_smollm2.yaml
    deepspeed --num_gpus 2 train_target.py recipes/train_target_smollm2.yaml --deepspeed ds_configs/zero3.json

Rows: chat rows (--messages_field; loss on assistant turns only), prompt/completion rows (--prompt_field,
--completion_field; loss on the completion) or plain text (--text_field). Outputs: the LoRA adapter (or the full
model), the tokenizer, a model card recording where the data came from (select_data.py's summary.json), and with
--merge_adapter the merged model under output_dir/merged. --push_to_hub --hub_model_id you/name uploads it.
"""


def main(argv=None) -> str:
    import logging
    import os

    import transformers
    from transformers import set_seed

    from lib.core.args import parse_args
    from lib.core.callbacks import (
        MetricsFileCallback,
        SafeCallback,
        load_user_callbacks,
    )
    from lib.core.hub import check_push_to_hub
    from lib.core.training_args import check_eval_data, prepare_output_dir
    from lib.models.adapters import merge_adapter
    from lib.models.args import ModelLoadArguments
    from lib.models.loading import load_model_and_tokenizer
    from lib.sft.args import LoraArguments, SFTDataArguments, TargetTrainingArguments
    from lib.sft.data import prepare_sft_datasets
    from lib.sft.trainer import TargetTrainer, selection_provenance

    # ---- arguments: everything that can be wrong is refused before a model loads -------------------------
    model_args, data_args, lora_args, args = parse_args(
        (ModelLoadArguments, SFTDataArguments, LoraArguments, TargetTrainingArguments), argv)
    model_args.trust_remote_code = args.trust_remote_code  # TRL's SFTConfig owns this flag
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    user_callbacks = load_user_callbacks(args.callbacks)
    check_push_to_hub(args.push_to_hub, args.hub_model_id)
    check_eval_data(args, bool(data_args.validation_file or data_args.validation_split_percentage))
    provenance = selection_provenance(data_args.train_file)  # refuses rows of an unfinished select_data.py run
    resume = prepare_output_dir(args)
    set_seed(args.seed)

    # ---- model and data ----------------------------------------------------------------------------
    model, tokenizer = load_model_and_tokenizer(model_args, args)
    train_ds, eval_ds = prepare_sft_datasets(data_args, args, tokenizer)
    if args.process_index == 0:
        print(f"data: {len(train_ds)} training rows" + (f", {len(eval_ds)} evaluation rows" if eval_ds else ""),
              flush=True)

    # ---- trainer -----------------------------------------------------------------------------------
    peft_config = lora_args.peft_config() if lora_args.use_peft else None
    lora = ({"r": lora_args.lora_r, "alpha": lora_args.lora_alpha, "target_modules": lora_args.lora_target_modules}
            if peft_config else None)
    trainer = TargetTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=peft_config, base_model=model_args.model_name_or_path, train_file=data_args.train_file,
        lora=lora, provenance=provenance,
    )
    for callback in [SafeCallback(MetricsFileCallback()), *user_callbacks]:
        trainer.add_callback(callback)

    # ---- train, save -------------------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=resume)
    if eval_ds is not None:
        trainer.log_metrics("eval", trainer.evaluate())
    trainer.save_model(args.output_dir)
    trainer.save_state()
    trainer.create_model_card()
    merged = None
    if lora_args.merge_adapter and trainer.is_world_process_zero():
        merged = merge_adapter(model_args, args.output_dir, os.path.join(args.output_dir, "merged"), args)
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="train_target.py: fine-tuned on selected data")
    if trainer.is_world_process_zero():
        kind = "LoRA adapter" if peft_config else "model"
        print(f"{kind}: {os.path.abspath(args.output_dir)}", flush=True)
        if merged:
            print(f"merged model: {merged}", flush=True)
    return args.output_dir


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
