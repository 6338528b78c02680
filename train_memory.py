#!/usr/bin/env python
"""Train a memory for a frozen model: explicit (stage 4 of the bank + gate + fusion) or recall (<recall> token).

--memory_type explicit: stage 4 of explicit memory, all memory parts on chat / instruction rows, the backbone
frozen. Memory-dependent rows (with memory_id) are mixed with general instruction rows (--general_file,
--general_mix_ratio) so general ability is kept. The recipe uses AdamW betas (0.9, 0.95), weight decay 0.1, a cosine
schedule with 10% warmup and ds_configs/zero2.json under the deepspeed launcher.

    python train_memory.py recipes/memory/train_memory_smollm2.yaml --memory_type explicit
    deepspeed --num_gpus 2 train_memory.py recipes/memory/train_memory_smollm2.yaml --memory_type explicit \
        --deepspeed ds_configs/zero2.json

--memory_type recall: chat logs -> memory entries (extracted by a model) -> vectors in a FAISS index -> the
<recall> token, its projector and LoRA trained to write a memory out from its vector and answer from it. A rerun
reads only new or changed conversations (state.json) and continues the model; see lib/recall/pipeline.py.

    python train_memory.py recipes/recall/train_recall_smollm2.yaml --memory_type recall
    python train_memory.py --memory_type recall --model_name_or_path builtin:smollm2-135m-instruct \
        --chat_logs data/chats/logs --qa_file data/chats/questions_train.jsonl --output_dir outputs/recall
    torchrun --nproc_per_node 2 train_memory.py recipes/recall/train_recall_smollm2.yaml --memory_type recall
    python -m lib.recall.ask outputs/recall --user_id u0100 "What is my dog called?"
"""


def main(argv=None) -> dict:
    import sys

    from lib.core.args import peek_setting

    argv = list(sys.argv[1:] if argv is None else argv)
    if peek_setting(argv, "memory_type") == "recall":
        from lib.recall.pipeline import run

        return run(argv)

    from lib.memory.args import MemoryTypeArguments
    from lib.memory.stages import run_stage

    return run_stage("memory", argv, extra_arguments=(MemoryTypeArguments,))


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
