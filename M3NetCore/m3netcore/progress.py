"""Progress of a long step with elapsed time and ETA: a redrawn bar or plain log lines.

On a terminal, and in a Jupyter notebook's output cell (which honours the carriage return),
a tqdm bar is redrawn in place::

    LIDC-phantom nodules:  42%|████▏     | 1100/2612 [03:02<04:10, 6.03 nodules/s]

Anywhere else (a log file, CI, a pipe) the same numbers come as plain lines, at most one
every ``every_s`` seconds and one at the end, with no carriage return or escape code::

    LIDC-phantom nodules: 1100/2612 (42%), elapsed 3:02, ETA 4:10, 6.03 nodules/s

A step that ends within ``delay_s`` seconds writes no line. tqdm does the counting, rate
and time formatting in both cases.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
STYLES = ("bar", "lines", "off")


class Progress:
    """Counts the steps of one long task and shows them on ``stream``.

    Args:
        description: what is counted, e.g. ``"LIDC nodule table"``.
        total: the number of steps.
        unit: the name of one step (``"scans"``, ``"nodules"``).
        stream: where to show it (default ``sys.stderr``).
        style: ``"bar"``, ``"lines"`` or ``"off"``; default: a bar on a terminal or in a
            notebook, lines elsewhere.
        every_s: seconds between lines (style ``"lines"``) or redraws (``"bar"``).
        initial: steps already done when the clock starts (not counted in the rate).
        delay_s: lines only: none until the task has run this long (a quick step stays quiet).

    Raises:
        ValueError: for an unknown ``style`` or a negative ``total``.
    """

    def __init__(self, description: str, total: int, *, unit: str = "steps", stream: TextIO | None = None,
                 style: str | None = None, every_s: float | None = None, initial: int = 0,
                 delay_s: float = 2.0) -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.style = style if style is not None else ("bar" if redraws_in_place(self.stream) else "lines")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.every_s = every_s if every_s is not None else (0.2 if self.style == "bar" else 10.0)
        self.delay_s = delay_s
        self.status = ""
        self._lines_shown = 0
        self._last_line = -float("inf")
        self._last_written: int | None = None
        self._started = time.perf_counter()
        # the counter: tqdm keeps the count and the rate and formats the times; it draws the
        # bar itself, but for lines it draws into nothing (it would write "\r" to a file too)
        self._counter = tqdm(
            total=total, initial=initial, desc=description, unit=f" {unit}", disable=self.style == "off",
            file=self.stream if self.style == "bar" else _Nowhere(),
            mininterval=self.every_s if self.style == "bar" else 3600.0,
            leave=False, dynamic_ncols=True, smoothing=0.1,
        )  # fmt: skip

    @property
    def done(self) -> int:
        return int(self._counter.n)

    @property
    def total(self) -> int:
        return int(self._counter.total)

    def due(self, done: int) -> bool:
        """Whether :meth:`update` to ``done`` would show something now."""
        if self.style != "lines":
            return self.style == "bar"  # tqdm limits the redraws itself
        now = time.perf_counter()
        if done >= self.total:
            return bool(self._lines_shown) or now - self._started >= self.delay_s
        has_rate = done > self._counter.initial
        return has_rate and now - self._started >= self.delay_s and now - self._last_line >= self.every_s

    def update(self, done: int, status: str = "") -> None:
        """Set the count to ``done`` (with ``status`` after the numbers) and show it if due."""
        step = done - self._counter.n
        if status != self.status:
            self.status = status
            if self.style == "bar":
                self._counter.set_postfix_str(status, refresh=False)
        if self.style == "lines":
            self._counter.update(step)
            if self.due(done):
                self._write_line()
        elif self.style == "bar":
            self._counter.update(step)
            if done >= self.total:
                self._counter.refresh()
        else:
            self._counter.n = done

    def advance(self, steps: int = 1, status: str = "") -> None:
        """Count ``steps`` more."""
        self.update(self.done + steps, status)

    def line(self) -> str:
        """The plain line of the current count: ``description: done/total (pct), elapsed, ETA, rate``."""
        meter = self._counter.format_dict
        elapsed = meter["elapsed"]
        done, total = self.done, self.total
        rate = (done - meter["initial"]) / elapsed if elapsed > 0 else 0.0
        parts = [f"{done}/{total}" + (f" ({100 * done / total:.0f}%)" if total else ""),
                 f"elapsed {tqdm.format_interval(elapsed)}"]  # fmt: skip
        if done < total:
            parts.append(f"ETA {tqdm.format_interval((total - done) / rate) if rate > 0 else '?'}")
        if rate > 0:
            parts.append(f"{rate:.2f}{meter['unit']}/s" if rate < 100 else f"{rate:.0f}{meter['unit']}/s")
        if self.status:
            parts.append(self.status)
        return f"{meter['prefix']}: " + ", ".join(parts)

    def close(self) -> None:
        """End the task: the bar is erased (the caller's summary line takes its place); a last
        line is written in style ``"lines"`` if lines were shown or the task took ``delay_s``."""
        if self.style == "lines" and self.done != self._last_written:
            if self._lines_shown or time.perf_counter() - self._started >= self.delay_s:
                self._write_line()
        self._counter.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._lines_shown += 1
        self._last_line = time.perf_counter()
        self._last_written = self.done


def track(items: Iterable[T], description: str, *, total: int | None = None, unit: str = "steps",
          stream: TextIO | None = None, style: str | None = None) -> Iterator[T]:  # fmt: skip
    """Yield ``items`` while showing their progress (see :class:`Progress`)."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total, unit=unit, stream=stream, style=style) as progress:
        for item in items:
            yield item
            progress.advance()


class Countdown:
    """Elapsed time and ETA of a loop whose items print a line each (cv folds, benchmark rows, CTs).

    ``Countdown(5).text(2)`` after 4 minutes reads ``2/5 done, elapsed 04:00, ETA 06:00``: a
    plain suffix for those lines, the same in a terminal, a notebook and a log file.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._started = time.perf_counter()

    def text(self, done: int) -> str:
        elapsed = time.perf_counter() - self._started
        parts = [f"{done}/{self.total} done", f"elapsed {tqdm.format_interval(elapsed)}"]
        if 0 < done < self.total:
            parts.append(f"ETA {tqdm.format_interval(elapsed / done * (self.total - done))}")
        return ", ".join(parts)


class _Nowhere:
    """A stream that keeps nothing (tqdm's output when the lines are written by :class:`Progress`)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def redraws_in_place(stream: TextIO) -> bool:
    """Whether ``stream`` shows a carriage return as a redraw: a terminal or a Jupyter output cell."""
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False
