"""The training progress bar: drawn in place on a terminal, absent elsewhere."""

from __future__ import annotations

import io

from m3netcore.train.config import RunConfig
from m3netcore.train.progress import ProgressBar
from m3netcore.train.run import train_run


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_redraws_one_line_and_clears_it():
    screen = Terminal()
    bar = ProgressBar(screen, width=10, interval=0.0)
    bar.update("epoch 1/2", 5, 10, "loss 1.2345 lr 1.00e-03 95 nodules/s")
    bar.update("epoch 1/2", 10, 10, "loss 0.9")
    drawn = screen.getvalue()
    assert drawn.startswith("\repoch 1/2 [#####.....] 5/10  loss 1.2345 lr 1.00e-03 95 nodules/s")
    second = drawn.split("\r")[2]
    assert second.startswith("epoch 1/2 [##########] 10/10  loss 0.9") and len(second) == len(drawn.split("\r")[1])
    bar.clear()
    assert screen.getvalue().endswith("\r") and "\n" not in screen.getvalue()


def test_no_bar_off_a_terminal_and_at_most_one_draw_per_interval():
    log = io.StringIO()
    bar = ProgressBar(log)  # a file, not a terminal: off
    bar.update("epoch 1/1", 1, 2, "x")
    assert not bar.enabled and log.getvalue() == ""
    screen = Terminal()
    slow = ProgressBar(screen, interval=3600.0)
    slow.update("e", 1, 10)
    slow.update("e", 2, 10)  # too soon: not drawn
    slow.update("e", 10, 10)  # the last step always is
    assert screen.getvalue().count("\r") == 2 and "10/10" in screen.getvalue()


def test_training_on_a_terminal_draws_the_bar_instead_of_step_lines(tiny_cache, tmp_path, monkeypatch):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    lines: list[str] = []
    config = RunConfig(epochs=1, batch_size=8, log_every=1)
    train_run(tiny_cache, "m3net", 0, tmp_path / "run", config, device="cpu", progress=True, log=lines.append)
    assert "epoch 1/1 [" in screen.getvalue() and "nodules/s" in screen.getvalue()
    assert not [line for line in lines if " step " in line]  # the bar replaced them
    assert any(line.startswith("epoch 1/1: loss") for line in lines)  # the epoch's summary stays
    quiet: list[str] = []
    train_run(tiny_cache, "m3net", 0, tmp_path / "plain", config, device="cpu", log=quiet.append)
    assert [line for line in quiet if " step " in line]  # without progress=True: the periodic lines
