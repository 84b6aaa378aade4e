"""`m3net benchmark throughput`: one run measures every model; bad options are one-line errors."""

from __future__ import annotations

import re

from m3netcore.cli import main


def test_throughput_measures_each_model_in_one_run(capsys):
    argv = ["benchmark", "throughput", "--models", "m3net", "single-micro", "--batch", "4", "--resnet-batch", "2",
            "--steps", "2", "--windows", "1", "--count", "8"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(m3net|single-micro)\s+random HU\s+8\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert {name for name, *_ in rows} == {"m3net", "single-micro"}
    assert [batch for _, batch, *_ in rows] == ["4", "4"]  # --batch: every model but resnet18x3
    for _, _, *rates in rows:  # whole step, augmentation alone, network alone (timed one after another)
        assert all(float(rate) > 0 for rate in rates)
    assert "ratio m3net/single-micro nodules/s:" in out and "CPU" in out
    assert "m3net: augmentation takes" in out and "the network alone bounds training at" in out


def test_throughput_refuses_unknown_models_and_empty_runs(capsys, tiny_cache):
    assert main(["benchmark", "throughput", "--models", "nonet"]) == 2
    assert "unknown model 'nonet'" in capsys.readouterr().err
    assert main(["benchmark", "throughput", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(["benchmark", "throughput", "--data", str(tiny_cache), "--count", "8"]) == 2
    assert "with --data the cache's nodules are used" in capsys.readouterr().err
