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
from m3netcore.data.manifest import read_rows_csv
from m3netcore.models import build_model
from m3netcore.train.checkpointing import CHECKPOINT_FILE, load_checkpoint
from m3netcore.train.config import RunConfig
from m3netcore.train.run import train_run

# Dropout off: each process draws its own dropout masks, which one process cannot reproduce.
# Everything else (batch-norm statistics, InfoNCE negatives, gradient averaging) is global.
CONFIG = RunConfig(epochs=1, batch_size=8, seed=1, log_every=100, model_config={"dropout": 0.0})
# Tolerances: the two runs differ only by floating-point summation order. What the network
# computes stays the same: the held-out logits agree within 1e-3 of their spread (measured
# 2e-4 after one epoch, 4 AdamW steps). The weights drift further apart in the directions the
# loss does not see: Adam's per-weight normalisation amplifies rounding in weights whose
# gradient is ~0 (an encoder the tiny task hardly uses, the attention key bias), so the L2
# distance between the runs' weights, relative to the distance they travelled from their
# initial values, is only bounded by 1e-2 (measured 3e-4 and 3e-3 with two noise draws).
LOGIT_TOLERANCE = 1e-3
WEIGHT_TOLERANCE = 1e-2


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
    assert (difference / travelled) ** 0.5 < WEIGHT_TOLERANCE

    def held_out_logits(run: Path) -> torch.Tensor:
        return torch.tensor([row["logit"] for row in read_rows_csv(run / "test_predictions.csv")])

    two_logits, one_logits = held_out_logits(tmp_path / "two"), held_out_logits(tmp_path / "one")
    assert len(one_logits) > 5 and float(one_logits.std()) > 0
    assert float((two_logits - one_logits).abs().max()) < LOGIT_TOLERANCE * float(one_logits.std())
