"""User-facing errors: one clear line that names the file or value and what to do."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix. ``str(error)`` is the single line printed to them."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and exit with its status; a :class:`UserError` prints ``error: <message>`` and exits 2."""
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(status or 0)
