"""User-facing errors: one clear line that names the file or value and what to do."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix. ``str(error)`` is the single line printed to them."""


class NonFiniteLossError(UserError):
    """A loss term, the gradient norm or the weights went NaN/inf; the message names the step and the term(s). Training
    stops without applying that step's update or writing a checkpoint."""


class OutputError(UserError):
    """A file or folder the run must write cannot be written (a file in the way, no permission, a full disk)."""


_OUTPUT_HINTS = {
    errno.ENOSPC: "free disk space or choose an output folder on another disk",
    errno.EDQUOT: "free space within your disk quota or choose an output folder on another disk",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.ENOTDIR: "a file is in the way of a folder on that path: remove it or choose another folder",
    errno.EEXIST: "a file is in the way of a folder on that path: remove it or choose another folder",
    errno.EISDIR: "a folder is in the way of a file on that path: name a file, not a folder",
}


def cannot_write(path: str | os.PathLike, error: OSError, kept: str = "") -> OutputError:
    """The one-line :class:`OutputError` for an ``OSError`` raised while writing ``path``; ``kept`` says what is
    intact (e.g. the previous checkpoint)."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = _OUTPUT_HINTS.get(error.errno, "check the path and the disk")
    return OutputError(f"cannot write {os.fspath(path)}: {reason} — {hint}" + (f"; {kept}" if kept else ""))


def out_of_memory(error: BaseException, hint: str) -> UserError | None:
    """The one-line :class:`UserError` for PyTorch's out-of-memory error (``torch.cuda.OutOfMemoryError``), naming
    what the failed allocation asked for and ``hint`` (what to lower); None for any other error."""
    import torch

    if not isinstance(error, torch.cuda.OutOfMemoryError):
        return None
    asked = re.search(r"Tried to allocate ([\d.]+ ?[KMGTP]?i?B)", str(error))
    what = f" (an allocation of {asked.group(1)} failed)" if asked else ""
    return UserError(f"out of GPU memory{what} — {hint}")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and exit with its status; a :class:`UserError` prints ``error: <message>`` and exits 2, as
    do a data-loader worker's failure that no loop named (:func:`projector_kd.data.worker_failure`: PyTorch may
    report it at any point of the main process) and running out of GPU memory (:func:`out_of_memory`).

    Under torchrun the run prints the line once: every rank exits 2, and a rank whose collective failed because
    another rank stopped on a user error ends quietly instead of with the backend's traceback."""
    from .data import worker_failure
    from .distributed import peer_reported_error, report_user_error

    def exit_with(error: UserError) -> None:
        if report_user_error(str(error)):
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)

    try:
        status = main(argv)
    except UserError as error:
        exit_with(error)
    except Exception as error:
        failure = worker_failure(error, "running") or out_of_memory(error, "lower the batch size")
        if failure is not None:
            exit_with(failure)
        if peer_reported_error() is None:
            raise
        sys.exit(2)
    sys.exit(status or 0)
