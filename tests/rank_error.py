"""A user error on one rank of a 2-process job: ``torchrun --nproc_per_node 2 tests/rank_error.py {1|all}``.

With ``1`` only rank 1 fails, while rank 0 waits for it at a barrier (which, left alone, would wait for the
process group's timeout); with ``all`` both fail, as a bad flag or file makes every rank fail.
"""

import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.core.errors import UserError, run_main  # noqa: E402


def main(argv) -> None:
    dist.init_process_group("gloo")
    if argv[0] == "all" or dist.get_rank() == 1:
        raise UserError(f"the input of rank {dist.get_rank()} is bad; fix it.")
    dist.barrier()


if __name__ == "__main__":
    run_main(main)
