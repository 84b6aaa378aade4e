"""A progress bar for training on a terminal: one line redrawn in place, no dependency.

On a terminal the trainer draws ``epoch 3/12 [#####.......] 25/40  loss 1.2345  lr 1.8e-03
95 nodules/s``, refreshed at most every ``interval`` seconds; the epoch's summary line then
replaces it. Anywhere else (a log file, CI, a notebook's captured output) the bar is off and
the trainer prints its periodic progress lines instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """One redrawn status line.

    Args:
        stream: where to draw (default ``sys.stderr``).
        enabled: draw at all; default: whether ``stream`` is a terminal.
        width: characters of the bar itself.
        interval: seconds between redraws (the last step is always drawn).
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, width: int = 24,
                 interval: float = 0.2) -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.width = width
        self.interval = interval
        self._last_draw = -float("inf")
        self._shown = 0  # length of the line on screen

    def due(self, done: int, total: int) -> bool:
        """Whether :meth:`update` would draw now (callers skip reading GPU numbers otherwise)."""
        return self.enabled and (done >= total or time.perf_counter() - self._last_draw >= self.interval)

    def update(self, label: str, done: int, total: int, text: str = "") -> None:
        """Draw ``label [bar] done/total text`` over the previous line, if :meth:`due`."""
        if not self.due(done, total):
            return
        filled = int(self.width * done / max(total, 1))
        line = f"{label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}  {text}".rstrip()
        self.stream.write("\r" + line + " " * max(0, self._shown - len(line)))
        self.stream.flush()
        self._shown = len(line)
        self._last_draw = time.perf_counter()

    def clear(self) -> None:
        """Blank the line, so that the next printed line starts clean."""
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0
            self._last_draw = -float("inf")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False
