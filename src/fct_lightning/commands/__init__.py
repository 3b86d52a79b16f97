"""The command layer: each console script parses its arguments, calls library functions and prints.

Nothing in the library imports this package. Every command runs through :func:`run_command`, so a user's mistake
(a wrong path, checkpoint, option or file) ends in one line that names the problem and the fix, with exit status 1;
``FCT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fct_lightning.commands.processes import stop_with_launcher

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FloatingPointError)
"""What a user can cause: options out of range, missing or wrong files, unusable checkpoints, caches or stores (their
errors are ValueErrors), NaN losses. Anything else is a bug and keeps its traceback."""


def run_command(prog: str, main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run ``main(argv)`` and return what it returns; a user error ends with ``<prog>: <message>`` on stderr and exit
    status 1 (console scripts' entry points drop the return value: one that is not None would be the exit status).
    A DDP worker that a launcher started ends with it (:func:`~fct_lightning.commands.processes.stop_with_launcher`)."""
    stop_with_launcher()
    try:
        return main(argv)
    except USER_ERRORS as err:
        if os.environ.get("FCT_DEBUG"):
            raise
        raise SystemExit(f"{prog}: {err}\n(set FCT_DEBUG=1 to see the traceback)") from err
