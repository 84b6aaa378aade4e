"""``m3net train`` under torchrun: two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import m3netcore
from m3netcore.models import build_model
from m3netcore.train.checkpointing import CHECKPOINT_FILE, load_checkpoint
from m3netcore.train.config import RunConfig
from m3netcore.train.run import train_run

# Dropout off: each process draws its own dropout masks, which one process cannot reproduce.
# Everything else (batch-norm statistics, InfoNCE negatives, gradient averaging) is global.
CONFIG = RunConfig(epochs=1, batch_size=8, seed=1, log_every=100, model_config={"dropout": 0.0})
# Tolerance: the two runs differ only by floating-point summation order. Over 4 AdamW steps
# (one epoch of the tiny cache) that stays below 0.1% of the distance the weights travel from
# their initial values (L2, all weights together; measured about 2e-4 after 8 steps). Adam's
# per-weight normalisation amplifies rounding in weights whose gradient is ~0 (the attention
# key bias cannot change the softmax), so there is no per-weight bound.
RELATIVE_TOLERANCE = 1e-3


@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_cache, tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(CONFIG.to_dict()))
    environment = os.environ | {
        "PYTHONPATH": str(Path(m3netcore.__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "m3netcore.cli", "train", "--data", str(tiny_cache), "--fold", "0",
        "--out", str(tmp_path / "two"), "--config", str(config_file), "--device", "cpu",
    ]  # fmt: skip
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("epoch 1/1:") == 1  # only rank 0 prints

    processes = json.loads((tmp_path / "two" / "processes.json").read_text())
    assert processes["world_size"] == 2 and processes["identical"] is True
    assert len(set(processes["weights_sha256"])) == 1

    train_run(tiny_cache, "m3net", 0, tmp_path / "one", CONFIG, device="cpu", log=lambda _: None)
    two = load_checkpoint(tmp_path / "two" / CHECKPOINT_FILE)
    one = load_checkpoint(tmp_path / "one" / CHECKPOINT_FILE)
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["mi_loss"] == pytest.approx(b["mi_loss"], rel=1e-5)  # InfoNCE over the global batch

    torch.manual_seed(CONFIG.seed)
    initial = build_model("m3net", CONFIG.model_config).state_dict()
    difference = travelled = 0.0
    for key, weight in one["network"].items():
        if weight.dtype.is_floating_point:
            difference += float(((two["network"][key] - weight) ** 2).sum())
            travelled += float(((weight - initial[key]) ** 2).sum())
    assert travelled > 0
    assert (difference / travelled) ** 0.5 < RELATIVE_TOLERANCE
