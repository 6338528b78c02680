#!/usr/bin/env python
"""Stage 3 of explicit memory: tune the gate and the fusion layers together.

Loss = answer LM loss + gate_loss_coef x gate cross-entropy (rows with memory_id) + similarity_loss_coef x (-mean
cosine of query and chosen entry keys) + diversity_loss_coef x (mean pairwise cosine of the retrieved entries). Every
coefficient is a flag and can be scheduled, as can ``gumbel_temperature`` (straight-through Gumbel-softmax over the
retrieved entries) and ``train_gate`` (0 holds the gate, 1 trains it), e.g. in a recipe:

    schedule:
      - {name: train_gate, value: 1, at_epoch: 1}
      - {name: gumbel_temperature, start: 1.5, end: 0.5, from_epoch: 0, to_epoch: 2}

    python train_joint.py recipes/memory/train_joint_smollm2.yaml
    torchrun --nproc_per_node 2 train_joint.py recipes/memory/train_joint_smollm2.yaml
    deepspeed --num_gpus 2 train_joint.py recipes/memory/train_joint_smollm2.yaml --deepspeed ds_configs/zero3.json
"""


def main(argv=None) -> dict:
    from lib.memory.stages import run_stage

    return run_stage("joint", argv)


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
