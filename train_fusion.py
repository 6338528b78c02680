#!/usr/bin/env python
"""Stage 2 of explicit memory: train the fusion layers (and their MemoryNorms) to use retrieved bank entries.

The backbone and the gate trained by stage 1 stay frozen; the loss is the LM loss on the answer tokens only. Each
fusion adds ``tanh(alpha) * fuse(h, memory)`` with alpha = 0 at the start, so step 0 is the frozen model exactly;
``fusion/alpha/<layer>`` is logged every step (and shown in the progress bar). ``--retrieval gold`` feeds each row's
gold entry instead of the gate's choice (no stage 1 needed).

    python train_fusion.py recipes/memory/train_fusion_smollm2.yaml
    python train_fusion.py --model_name_or_path builtin:smollm2-135m-instruct --init_from outputs/memory/gate \
        --memory_bank data/facts/bank.jsonl --train_file data/facts/qa_train.jsonl \
        --validation_file data/facts/qa_validation.jsonl --output_dir outputs/memory/fusion
    torchrun --nproc_per_node 2 train_fusion.py recipes/memory/train_fusion_smollm2.yaml
    deepspeed --num_gpus 2 train_fusion.py recipes/memory/train_fusion_smollm2.yaml --deepspeed ds_configs/zero2.json

Resume with --resume_from_checkpoint true (or a checkpoint-N folder).
"""


def main(argv=None) -> dict:
    from lib.memory.stages import run_stage

    return run_stage("fusion", argv)


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
