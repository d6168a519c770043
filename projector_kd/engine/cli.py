"""The entry points' ``main`` wrapper: every user-facing failure ends in one ``error:`` line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch.distributed

from .data import worker_failure
from .distributed import peer_reported_error, report_user_error
from .errors import UserError, name_too_long, out_of_memory


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and exit with its status; a :class:`UserError` prints ``error: <message>`` and exits 2, as
    do a data-loader worker's failure that no loop named (:func:`projector_kd.engine.data.worker_failure`: PyTorch may
    report it at any point of the main process), running out of GPU memory (:func:`out_of_memory`) and a path whose
    name the file system refuses as too long (:func:`name_too_long`).

    Under torchrun the run prints the line once: every rank exits 2, and a rank whose collective failed because
    another rank stopped on a user error ends quietly instead of with the backend's traceback; a collective that
    failed for another reason (timed out, a peer gone) is one line too."""

    def exit_with(error: UserError) -> None:
        if report_user_error(str(error)):
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)

    try:
        status = main(argv)
    except UserError as error:
        exit_with(error)
    except Exception as error:
        failure = (
            worker_failure(error, "running") or out_of_memory(error, "lower the batch size") or name_too_long(error)
        )
        if failure is not None:
            exit_with(failure)
        if peer_reported_error() is not None:
            sys.exit(2)
        if isinstance(error, torch.distributed.DistError):  # a collective timed out, or a peer's connection closed
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            exit_with(
                UserError(
                    f"this process lost the other processes of the run ({reason[:200]}) — one of them stopped or "
                    f"hangs: check every process's output, then rerun the same command to continue from the last "
                    f"checkpoint"
                )
            )
        raise
    sys.exit(status or 0)
