"""The trainer's progress: one :class:`m3netcore.progress.Progress` per epoch, named by its label.

On a terminal or in a notebook the epoch is a redrawn tqdm bar with elapsed time, ETA and
the trainer's status (loss, learning rate, nodules/s); the epoch's summary line then
replaces it. In a log file the same numbers come as a plain line at most every
``line_every_s`` seconds::

    epoch 3/12: 25/40 (62%), elapsed 00:10, ETA 00:06, 2.5 steps/s, loss 1.2345 lr 1.80e-03 95 nodules/s
"""

from __future__ import annotations

import sys
from typing import TextIO

from m3netcore.progress import Progress, redraws_in_place


class ProgressBar:
    """The epoch's progress, shown while training.

    Args:
        stream: where to show it (default ``sys.stderr``).
        enabled: show it at all (default: yes; a bar on a terminal or in a notebook, lines elsewhere).
        interval: seconds between redraws of the bar.
        line_every_s: seconds between plain lines (off a terminal).
        delay_s: an epoch shorter than this shows nothing (its summary line suffices).
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, interval: float = 0.2,
                 line_every_s: float = 10.0, delay_s: float = 2.0) -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = True if enabled is None else enabled
        self.interval, self.line_every_s, self.delay_s = interval, line_every_s, delay_s
        self._label: str | None = None
        self._progress: Progress | None = None

    def due(self, done: int, total: int) -> bool:
        """Whether :meth:`update` would show something now (callers skip reading GPU numbers otherwise)."""
        if not self.enabled:
            return False
        if self._progress is None or self._progress.total != total:
            return True  # the first step of a task: starts its clock
        return self._progress.due(done)

    def update(self, label: str, done: int, total: int, text: str = "") -> None:
        """Count ``label``'s task at ``done`` of ``total`` steps with ``text`` after the numbers."""
        if not self.enabled:
            return
        if self._progress is None or label != self._label or total != self._progress.total:
            self.clear()
            self._label = label
            every_s = self.interval if redraws_in_place(self.stream) else self.line_every_s
            # the first call comes after the first step: the clock starts there
            self._progress = Progress(label, total, stream=self.stream, delay_s=self.delay_s, initial=done,
                                      every_s=every_s)  # fmt: skip
        self._progress.update(done, text)

    def clear(self) -> None:
        """End the task shown: the bar is erased, so that the next printed line starts clean."""
        if self._progress is not None:
            self._progress.close()
            self._progress, self._label = None, None

