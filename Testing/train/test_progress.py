"""The training progress: a redrawn bar on a terminal, plain lines with elapsed time and ETA in a log."""

from __future__ import annotations

import io
import re
import time

from m3netcore.train.config import RunConfig
from m3netcore.train.progress import ProgressBar
from m3netcore.train.run import train_run

CONTROL = re.compile(r"[\r\x1b\x08]")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_epoch_is_a_redrawn_bar_with_eta_that_is_erased_at_the_end():
    screen = Terminal()
    bar = ProgressBar(screen, interval=0.0)
    for done in range(1, 11):
        bar.update("epoch 1/2", done, 10, f"loss {1 / done:.4f} 95 nodules/s")
    drawn = screen.getvalue()
    assert drawn.count("\r") >= 2 and "\n" not in drawn  # one line, redrawn in place
    last = drawn.rstrip("\r ").split("\r")[-1]
    assert last.startswith("epoch 1/2: 100%|") and "10/10 [00:00<00:00" in last and "loss 0.1000" in last
    bar.clear()
    assert screen.getvalue().endswith("\r") and screen.getvalue().split("\r")[-2].strip() == ""


def test_in_a_log_file_plain_lines_with_elapsed_and_eta_at_most_every_line_every_s():
    log = io.StringIO()  # a file: no terminal
    bar = ProgressBar(log, line_every_s=0.05, delay_s=0.0)
    for done in range(1, 21):
        if bar.due(done, 20):
            bar.update("epoch 2/3", done, 20, "loss 0.5")
        time.sleep(0.01)
    bar.clear()
    text = log.getvalue()
    assert not CONTROL.search(text)
    lines = text.splitlines()
    assert 2 <= len(lines) < 20  # rate-limited, but more than the last one
    assert re.fullmatch(r"epoch 2/3: \d+/20 \(\d+%\), elapsed 00:00, ETA 00:00, [\d.]+ steps/s, loss 0\.5", lines[0])
    assert lines[-1].startswith("epoch 2/3: 20/20 (100%), elapsed") and "ETA" not in lines[-1]


def test_a_quick_epoch_writes_no_line_to_a_log_and_disabled_shows_nothing():
    log = io.StringIO()
    quick = ProgressBar(log)  # delay_s 2: an epoch of milliseconds needs no progress line
    for done in range(1, 6):
        quick.update("epoch 1/1", done, 5)
    quick.clear()
    off = ProgressBar(Terminal(), enabled=False)
    off.update("epoch 1/1", 5, 5)
    assert log.getvalue() == "" and not off.due(5, 5) and off.stream.getvalue() == ""


def test_training_on_a_terminal_draws_the_bar_instead_of_step_lines(tiny_cache, tmp_path, monkeypatch):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    lines: list[str] = []
    config = RunConfig(epochs=1, batch_size=8, log_every=1)
    train_run(tiny_cache, "m3net", 0, tmp_path / "run", config, device="cpu", progress=True, log=lines.append)
    assert "epoch 1/1: " in screen.getvalue() and "nodules/s" in screen.getvalue() and "%|" in screen.getvalue()
    assert not [line for line in lines if " step " in line]  # the bar replaced them
    assert any(line.startswith("epoch 1/1: loss") for line in lines)  # the epoch's summary stays
    quiet: list[str] = []
    train_run(tiny_cache, "m3net", 0, tmp_path / "plain", config, device="cpu", log=quiet.append)
    assert [line for line in quiet if " step " in line]  # without progress=True: the periodic lines
