"""Reproduces the abort at the end of successful multi-process CPU runs, and checks that run_main avoids it.

Launch with ``torchrun --nproc_per_node 2 tests/exit_race.py [--without-fix]``. Both ranks are pinned to one core
and gloo's worker threads get the idle scheduling class, so they finish their last collective only after the
main thread is done: what a busy machine does now and then, made certain. Without the fix (a plain exit after
``destroy_process_group``, the old ``run_main``) a rank aborts with "terminate called without an active
exception" after printing "done"; with ``run_main`` every rank exits 0.
"""

import os
import sys

# Pin before torch starts any thread, so every thread of both ranks shares one core.
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv) -> None:
    dist.init_process_group("gloo")
    # Every thread but the main one now belongs to gloo (its worker threads and its transport loop).
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid != os.getpid():
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(32, 32))
    for _ in range(2):
        model(torch.randn(4, 32)).sum().backward()
    for _ in range(3):
        out = [torch.zeros(2) for _ in range(dist.get_world_size())]
        dist.all_gather(out, torch.ones(2))
    print(f"rank {dist.get_rank()} done", flush=True)


if __name__ == "__main__":
    if "--without-fix" in sys.argv:
        main(sys.argv[1:])
        dist.destroy_process_group()
    else:
        from lib.core.errors import run_main

        run_main(main)
