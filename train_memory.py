#!/usr/bin/env python
"""Stage 4 of explicit memory: train all memory parts on chat / instruction rows, the backbone frozen.

Memory-dependent rows (with memory_id) are mixed with general instruction rows (--general_file,
--general_mix_ratio) so general ability is kept. The recipe uses AdamW betas (0.9, 0.95), weight decay 0.1, a cosine
schedule with 10% warmup and ds_configs/zero2.json under the deepspeed launcher.

    python train_memory.py recipes/memory/train_memory_smollm2.yaml --memory_type explicit
    deepspeed --num_gpus 2 train_memory.py recipes/memory/train_memory_smollm2.yaml --memory_type explicit \
        --deepspeed ds_configs/zero2.json

--memory_type explicit is the only kind so far.
"""


def main(argv=None) -> dict:
    from lib.memory.args import MemoryTypeArguments
    from lib.memory.stages import run_stage

    return run_stage("memory", argv, extra_arguments=(MemoryTypeArguments,))


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
