"""User-fixable errors: scripts print them as one sentence (no traceback) and exit with status 2."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(ValueError):
    """Something the user can fix (a flag, a file, a field); the message says what, where and how."""


def run_main(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Call a script's ``main``; a :class:`UserError` becomes ``error: <sentence>`` on stderr and exit code 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits.

    Left to interpreter shutdown, the communication threads of a gloo/DeepSpeed CPU group are sometimes destroyed
    while still running, and a run that finished and saved everything aborts ("terminate called without an active
    exception").
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
