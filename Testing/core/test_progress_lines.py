"""m3netcore.progress: a bar on a terminal, plain lines with elapsed time and ETA in a log file."""

from __future__ import annotations

import io
import re
import time

import pytest

from m3netcore.progress import Countdown, Progress, track

CONTROL = re.compile(r"[\r\x1b\x08]")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_plain_lines_with_elapsed_eta_and_rate():
    log = io.StringIO()
    with Progress("LIDC-phantom nodules", 30, unit="nodules", stream=log, every_s=0.05, delay_s=0.0) as progress:
        for _ in range(30):
            time.sleep(0.005)
            progress.advance()
    text = log.getvalue()
    assert progress.style == "lines" and not CONTROL.search(text)
    lines = text.splitlines()
    assert 2 <= len(lines) <= 30
    assert re.fullmatch(r"LIDC-phantom nodules: \d+/30 \(\d+%\), elapsed 00:00, ETA 00:00, [\d.]+ nodules/s", lines[0])
    assert lines[-1].startswith("LIDC-phantom nodules: 30/30 (100%), elapsed 00:00, ")


def test_a_terminal_gets_a_redrawn_bar_that_is_erased_when_done():
    screen = Terminal()
    for _ in track(range(5), "LIDC nodule table", unit="scans", stream=screen):
        pass
    drawn = screen.getvalue()
    assert "\n" not in drawn and "LIDC nodule table: 100%|" in drawn and "5/5 [" in drawn
    assert drawn.endswith("\r")  # erased: the next line starts clean


def test_a_quick_step_writes_no_line_and_bad_settings_fail():
    log = io.StringIO()
    assert list(track([1, 2, 3], "quick", stream=log)) == [1, 2, 3]
    assert log.getvalue() == ""
    with pytest.raises(ValueError, match="'fancy'"):
        Progress("x", 3, style="fancy")
    with pytest.raises(ValueError, match="-1"):
        Progress("x", -1)


def test_a_countdown_gives_elapsed_and_eta_for_per_item_lines():
    countdown = Countdown(4)
    time.sleep(0.05)
    middle, last = countdown.text(1), countdown.text(4)
    assert re.fullmatch(r"1/4 done, elapsed 00:00, ETA 00:00", middle)
    assert last == "4/4 done, elapsed 00:00"  # nothing left: no ETA
    assert countdown.text(0) == "0/4 done, elapsed 00:00"  # no item yet: no rate to guess from
