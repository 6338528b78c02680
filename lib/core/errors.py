"""User-fixable errors, and how every script starts and ends (one sentence on bad input; clean multi-process exits)."""

from __future__ import annotations

import atexit
import os
import sys
import time
import traceback
from collections.abc import Callable

# How long a rank other than 0 waits before printing its own error: the launchers (torchrun polls every 0.1 s,
# deepspeed every 1 s) stop the whole job as soon as rank 0 exits with the same error, so it is printed once.
NONZERO_RANK_ERROR_GRACE_S = 5.0


# What the scripts need installed; a missing one means the wrong Python is running them.
_REQUIRED_PACKAGES = frozenset({"torch", "transformers", "datasets", "accelerate", "peft", "trl", "deepspeed",
                                "lm_eval", "safetensors", "yaml", "huggingface_hub", "pyarrow", "numpy"})


class UserError(ValueError):
    """Something the user can fix (a flag, a file, a field); the message says what, where and how."""


class DataError(UserError):
    """A problem with the user's data, phrased as one actionable sentence."""


def launched_rank() -> int:
    """This process's global rank as the launcher (torchrun, deepspeed, accelerate) set it; 0 when not launched."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_main(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a script's ``main`` and end the process the way every script ends.

    A :class:`UserError` becomes ``error: <sentence>`` on stderr and exit status 2. In a multi-process run the
    sentence is printed once (by rank 0; another rank prints only if the job is still running seconds later, i.e.
    the error was its own) and every rank ends at once: a failing rank exits, and the launcher stops the others.
    A multi-process run that succeeds waits for every rank at a barrier, then ends through
    :func:`_end_distributed_process`.
    """
    distributed = launched_world_size() > 1
    code = 0
    try:
        main(sys.argv[1:] if argv is None else argv)
        if distributed:
            _barrier()  # no rank leaves while another is still writing its outputs
    except UserError as err:
        code = 2
        if distributed and launched_rank() != 0:
            time.sleep(NONZERO_RANK_ERROR_GRACE_S)
            print(f"error (rank {launched_rank()}): {err}", file=sys.stderr, flush=True)
        else:
            print(f"error: {err}", file=sys.stderr, flush=True)
    except ModuleNotFoundError as err:
        if err.name not in _REQUIRED_PACKAGES:
            raise
        code = 2
        print(f"error: this Python ({sys.executable}) has no '{err.name}' package; run `make setup` once, then use "
              "`.venv/bin/python` (or `source .venv/bin/activate` first).", file=sys.stderr, flush=True)
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr, flush=True)
    except BaseException:
        if not distributed:
            raise
        code = 1
        traceback.print_exc()
    finally:
        _close_process_group()
    if distributed:
        _end_distributed_process(code)
    if code:
        raise SystemExit(code)


def _barrier() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _close_process_group() -> None:
    _remove_deepspeed_shm_buffer()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _remove_deepspeed_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps a 67 MB file in /dev/shm per rank (named after the user, MASTER_ADDR,
    MASTER_PORT and the rank) and never unlinks it (its ``shared_close`` is never called), so every multi-process
    CPU run would leave 67 MB x ranks of RAM behind. Each rank unlinks its own at the end; the other ranks'
    mappings stay valid until they exit."""
    if "deepspeed" not in sys.modules or launched_world_size() < 2:
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{launched_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass  # not created (GPU runs, or ranks on several machines) or already gone


def _end_distributed_process(code: int) -> None:
    """End a process of a multi-process run without interpreter shutdown racing the gloo worker threads.

    The Trainer's DDP wrapper keeps the process group alive after ``destroy_process_group`` (PyTorch holds it
    from C++), so gloo's worker threads outlive ``main``. A worker that finishes its last collective late (a
    busy machine) releases tensors owned by Python objects after the interpreter has started shutting down;
    Python then ends that thread with ``pthread_exit``, which unwinds through a ``noexcept`` C++ frame and
    aborts the process ("terminate called without an active exception") after the run has succeeded.
    ``tests/exit_race.py`` reproduces it deterministically. So: do what a normal exit does that matters here
    (flush the streams, run the ``atexit`` handlers: logging, trackers, temporary files), then leave with
    ``os._exit`` before those threads can touch the interpreter.
    """
    try:
        atexit._run_exitfuncs()  # the hooks a normal exit runs (logging.shutdown, trackers, tempfile cleanup)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream has nothing left to flush
                pass
        os._exit(code)
