"""Progress bars that read well off a terminal, and log lines that do not break them.

:func:`progress_bar`: a ``tqdm`` bar that redraws at most every :data:`NON_TTY_INTERVAL` seconds when its
stream (stderr) is not a terminal (SLURM logs, CI, ``2> file``), so such files get a line now and then
rather than one per update. While the bar is open, the console handlers of the root and ``mtlora`` loggers
write through ``tqdm.write`` (``tqdm.contrib.logging.logging_redirect_tqdm``), so log lines appear above the
bar instead of cutting it; file handlers are untouched.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

#: seconds between redraws of a bar whose stream is not a terminal
NON_TTY_INTERVAL = 30.0


def min_interval(stream=None) -> float:
    """tqdm's ``mininterval`` for ``stream`` (default stderr): 0.1 s on a terminal, else :data:`NON_TTY_INTERVAL`."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return 0.1 if callable(isatty) and isatty() else NON_TTY_INTERVAL


def _has_console_handler(logger: logging.Logger) -> bool:
    return any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in logger.handlers
    )


class ProgressBar:
    """A tqdm bar (``update`` / ``set_postfix`` / ``close``) with log lines redirected above it until closed.

    ``close`` may be called more than once."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", disable: bool = False) -> None:
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=disable,
            dynamic_ncols=True,
            mininterval=min_interval(),
        )
        self._redirect = None
        if not disable:
            loggers = [lg for lg in (logging.root, logging.getLogger("mtlora")) if _has_console_handler(lg)]
            if loggers:  # a logger without a console handler would get one (duplicate lines)
                self._redirect = logging_redirect_tqdm(loggers=loggers)
                self._redirect.__enter__()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **kwargs: Any) -> None:
        self.bar.set_postfix(**kwargs, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
