"""Runs train_router.py with the ZeRO-3 input-grad fix removed (leaf modules still set): the negative control
of test_distributed.py, proving that the test catches the original failure."""

import sys

import deepspeed

import lib.models.deepspeed as ds_glue
import lib.models.moe as moe


def leaf_modules_only(model):
    classes = moe.moe_block_classes(model)
    if classes:
        deepspeed.utils.set_z3_leaf_modules(model, classes)


ds_glue.prepare_moe_for_zero3 = leaf_modules_only

if __name__ == "__main__":
    import train_router
    from lib.core.errors import run_main

    run_main(train_router.main, sys.argv[1:])
