"""User-facing errors: one clear line that names the file or value and what to do."""

from __future__ import annotations

import errno
import os
import re


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
    errno.ENAMETOOLONG: "a name on that path is longer than the file system allows (usually 255 bytes): choose a "
    "shorter one",
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


def name_too_long(error: BaseException) -> UserError | None:
    """The one-line :class:`UserError` for an ``OSError`` saying a path's name is longer than the file system allows
    (``ENAMETOOLONG``, which pathlib's checks raise on any path, read or written), naming the path; None for any other
    error."""
    if not isinstance(error, OSError) or error.errno != errno.ENAMETOOLONG:
        return None
    return UserError(f"{os.fspath(error.filename)}: {error.strerror} — {_OUTPUT_HINTS[errno.ENAMETOOLONG]}")
