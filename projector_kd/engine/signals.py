"""Graceful stop on SIGTERM / SIGINT (what schedulers and Ctrl-C send): finish the step, checkpoint, exit non-zero."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_STATUS_STOPPED = 3


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT set :attr:`requested` instead of killing the process.

    The training loop polls ``requested`` after each step, writes a resumable checkpoint and exits with
    :data:`EXIT_STATUS_STOPPED`. A second signal while a stop is pending restores the default handler and re-raises it,
    so an impatient user can still kill the run.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        _active.append(self)
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        _active.remove(self)


_active: list[GracefulStop] = []  # the GracefulStop blocks this process is in, innermost last


def requested_stop() -> GracefulStop | None:
    """The active :class:`GracefulStop` that received a signal, or None."""
    return next((stop for stop in reversed(_active) if stop.requested), None)


def stop_cause(stop: Any, distributed: bool) -> str:
    """What stopped a run, for its last line: the signal this process received; else, in a multi-process run,
    another process's (it reached this one through the ranks' stop vote); else a request from the calling code."""
    name = getattr(stop, "signal_name", None)
    if name:
        return name
    return "a signal to another process of the run" if distributed else "request"
