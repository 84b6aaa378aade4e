"""``m3net train``: outputs, patient-level split, exact resume, bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from m3netcore.checkpoint import load_model
from m3netcore.cli import main
from m3netcore.data.cache import open_cache
from m3netcore.models import build_model
from m3netcore.train.checkpointing import CHECKPOINT_FILE, load_checkpoint
from m3netcore.train.config import RunConfig
from m3netcore.train.dataset import split_cache
from m3netcore.train.run import train_run
from m3netcore.train.trainer import METRIC_COLUMNS

QUICK = RunConfig(epochs=3, batch_size=8, log_every=100, seed=1)


def test_split_holds_out_the_fold_and_never_splits_a_patient(tiny_cache):
    cache = open_cache(tiny_cache)
    split = split_cache(cache, "mean-excl3", 2, seed=0)
    patients = {
        part: {cache.rows[i]["patient_id"] for i in getattr(split, part)} for part in ("train", "validation", "test")
    }
    assert {cache.rows[i]["fold"] for i in split.test} == {2}
    assert 2 not in {cache.rows[i]["fold"] for i in (*split.train, *split.validation)}
    assert not patients["train"] & patients["validation"]
    assert not patients["test"] & (patients["train"] | patients["validation"])
    assert len(split.train) + len(split.validation) + len(split.test) == len(cache)
    assert 0 < len(split.validation) < len(split.train)


def test_interrupted_then_resumed_run_ends_bitwise_identical(tiny_cache, tmp_path):
    straight = train_run(tiny_cache, "m3net", 0, tmp_path / "straight", QUICK, device="cpu", log=lambda _: None)
    stopped = train_run(
        tiny_cache, "m3net", 0, tmp_path / "resumed", QUICK, stop_after_epoch=1, device="cpu", log=lambda _: None
    )
    assert stopped["stopped_after_epoch"] == 1
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["epoch"] == 1
    train_run(tiny_cache, "m3net", 0, tmp_path / "resumed", None, resume=True, device="cpu", log=lambda _: None)

    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT_FILE)
    b = load_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)
    assert a["epoch"] == b["epoch"] == 3
    assert [r["val_auc"] for r in a["history"]] == [r["val_auc"] for r in b["history"]]
    for key, tensor in a["network"].items():
        assert torch.equal(tensor, b["network"][key]), key
    model_a = load_file(tmp_path / "straight" / "model.safetensors")
    model_b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    # the weights did move: training happened in both
    torch.manual_seed(QUICK.seed)
    initial = build_model("m3net").state_dict()
    assert not torch.equal(initial["vote.weight"], a["network"]["vote.weight"])
    aucs = [row["val_auc"] for row in b["history"]]
    assert straight["best_epoch"] == aucs.index(max(aucs)) + 1  # the first epoch of best validation AUC
    # the tiny cache's rule (malignant nodules are larger) is learnt: the held-out fold is separated
    assert straight["test_auc"] > 0.8


def test_a_training_process_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tiny_cache, tmp_path):
    """SIGKILL in the middle of epoch 2 (no clean stop, no handler runs); --resume redoes epoch 2."""
    import os
    import signal
    import subprocess
    import sys

    settings = tmp_path / "quick.json"
    settings.write_text(json.dumps(QUICK.replace(log_every=1).to_dict()))
    argv = ["train", "--data", str(tiny_cache), "--model", "m3net", "--fold", "0", "--config", str(settings),
            "--device", "cpu", "--out", str(tmp_path / "killed")]  # fmt: skip
    unbuffered = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "m3netcore.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=unbuffered)  # fmt: skip
    seen = []
    for line in process.stdout:
        seen.append(line)
        # The summary line comes after epoch 1's checkpoint is written; epoch 2 starts at once.
        # (Per-step lines are not printed here: in a log the progress lines come every 10 s.)
        if line.startswith("epoch 1/3: loss"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    assert load_checkpoint(tmp_path / "killed" / CHECKPOINT_FILE)["epoch"] == 1
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    # The resumed and the straight run in fresh processes too, so that all three compute alike
    # (this test process's torch settings may have been changed by earlier tests).
    for extra in (["--resume"], []):
        folder = "killed" if extra else "straight"
        done = subprocess.run([sys.executable, "-m", "m3netcore.cli", *argv[:-1], str(tmp_path / folder), *extra],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    model = load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(model[k], resumed[k]) for k in model)
    training = load_model(tmp_path / "killed" / "model.safetensors").metadata["training"]
    straight = load_model(tmp_path / "straight" / "model.safetensors").metadata["training"]
    assert training["best_epoch"] == straight["best_epoch"]


def test_run_writes_metrics_plot_and_a_loadable_model_with_its_card(tiny_cache, tmp_path):
    run = tmp_path / "run"
    summary = train_run(tiny_cache, "m3net", 1, run, QUICK.replace(epochs=2), device="cpu", log=lambda _: None)
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["val_auc"]) <= 1.0 and float(r["nodules_per_s"]) > 0 for r in rows)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # cosine decay
    for r in rows:  # the total is its parts: BCE + lambda InfoNCE + vote weight x per-scale votes
        parts = float(r["bce_loss"]) + QUICK.mi_weight * float(r["mi_loss"]) + QUICK.vote_weight * float(r["vote_loss"])
        assert float(r["vote_loss"]) > 0 and float(r["train_loss"]) == pytest.approx(parts, rel=1e-6)
    assert (run / "curves.png").stat().st_size > 5000
    model = load_model(run / "model.safetensors")
    assert model.architecture == "m3net"
    assert model.temperature == pytest.approx(summary["temperature"])
    assert "fold 1" in model.card and "mean-excl3" in model.card and "SEMI-SYNTHETIC" in model.card
    assert model.metadata["training"]["semi_synthetic"] is True
    assert model.metadata["training"]["validation_auc"] == pytest.approx(max(float(r["val_auc"]) for r in rows))
    with open(run / "test_predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    cache = open_cache(tiny_cache)
    assert {p["nodule_id"] for p in predictions} == {r["nodule_id"] for r in cache.rows if r["fold"] == 1}
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_a_run_folder_is_not_overwritten_and_resume_needs_a_run(tiny_cache, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        train_run(tiny_cache, "m3net", 0, tmp_path / "busy", QUICK, device="cpu", log=lambda _: None)
    with pytest.raises(ValueError, match="holds no run"):
        train_run(tiny_cache, "m3net", 0, tmp_path / "none", None, resume=True, device="cpu", log=lambda _: None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--data", "{missing}"], "not an M3Net cache"),
        (["--model", "no-such-net"], "unknown model architecture 'no-such-net'"),
        (["--fold", "7"], "--fold 7 out of range"),
        (["--fold", "most"], "a fold number or 'all', not 'most'"),
        (["--protocol", "loudest"], "unknown label protocol 'loudest'"),
        (["--epochs", "0"], "epochs must be positive"),
        (["--config", "{missing}/c.json"], "no config file"),
    ],
)
def test_bad_training_input_is_one_line_and_exit_2(tiny_cache, tmp_path, capsys, options, message):
    arguments = {"--data": str(tiny_cache), "--model": "m3net", "--fold": "0", "--out": str(tmp_path / "run")}
    extra = []
    for flag, value in zip(options[::2], options[1::2], strict=True):
        value = value.format(missing=tmp_path / "missing")
        if flag in arguments:
            arguments[flag] = value
        else:
            extra += [flag, value]
    argv = ["train", *[x for pair in arguments.items() for x in pair], *extra]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("m3net: error:")
    assert message in error
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_bad_config_file_is_named(tmp_path, tiny_cache, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"epochs": 2, "learning_rat": 0.1}))
    assert main(["train", "--data", str(tiny_cache), "--fold", "0", "--out", str(tmp_path / "r"),
                 "--config", str(config)]) == 2  # fmt: skip
    assert "unknown training setting(s) ['learning_rat']" in capsys.readouterr().err


def test_resume_refuses_another_fold_or_model(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train_run(tiny_cache, "m3net", 0, run, QUICK, stop_after_epoch=1, device="cpu", log=lambda _: None)
    with pytest.raises(ValueError, match=r"another run: its fold 0 \(given 2\)"):
        train_run(tiny_cache, "m3net", 2, run, None, resume=True, device="cpu", log=lambda _: None)
    with pytest.raises(ValueError, match="architecture 'm3net' \\(given 'single-micro'\\)"):
        train_run(tiny_cache, "single-micro", 0, run, None, resume=True, device="cpu", log=lambda _: None)


def test_all_folds_trains_on_every_fold_and_holds_none_out(tiny_cache, tmp_path):
    cache = open_cache(tiny_cache)
    split = split_cache(cache, "mean-excl3", None, seed=0)
    assert len(split.test) == 0 and len(split.train) + len(split.validation) == len(cache)
    patients = [{cache.rows[i]["patient_id"] for i in part} for part in (split.train, split.validation)]
    assert not patients[0] & patients[1]
    run = tmp_path / "all"
    (tmp_path / "quick.json").write_text(json.dumps({"batch_size": 8, "log_every": 100}))
    assert main(["train", "--data", str(tiny_cache), "--fold", "all", "--out", str(run), "--epochs", "1",
                 "--config", str(tmp_path / "quick.json"), "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((run / "split.json").read_text())["test"]["nodules"] == 0
    assert not (run / "test_predictions.csv").exists()
    model = load_model(run / "model.safetensors")
    assert model.name == "m3net-allfolds" and "Held-out test fold: none" in model.card
    assert "No held-out fold" in model.card and model.metadata["training"]["fold"] is None


def test_a_run_checkpointed_before_the_vote_loss_column_resumes(tiny_cache, tmp_path):
    from m3netcore.train.checkpointing import save_checkpoint

    run = tmp_path / "old"
    config = QUICK.replace(epochs=2)
    train_run(tiny_cache, "m3net", 0, run, config, stop_after_epoch=1, device="cpu", log=lambda _: None)
    state = load_checkpoint(run / CHECKPOINT_FILE)
    for row in state["history"]:
        del row["vote_loss"]  # as the trainer wrote it before the column existed
    save_checkpoint(run / CHECKPOINT_FILE, state)
    train_run(tiny_cache, "m3net", 0, run, None, resume=True, device="cpu", log=lambda _: None)
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == METRIC_COLUMNS and [r["vote_loss"] == "" for r in rows] == [True, False]
    assert (run / "model.safetensors").is_file() and (run / "curves.png").is_file()


def test_curves_are_drawn_after_the_last_epoch_before_a_stop_and_otherwise_at_most_once_a_minute(
    tiny_cache, tmp_path, monkeypatch
):
    from m3netcore.train import trainer

    drawn, draw = [], trainer._plot

    def draw_and_count(history, out):  # the real plot, counted
        drawn.append(len(history))
        draw(history, out)

    monkeypatch.setattr(trainer, "_plot", draw_and_count)
    monkeypatch.setattr(trainer, "PLOT_EVERY_S", 1e9)
    train_run(tiny_cache, "m3net", 0, tmp_path / "straight", QUICK, device="cpu", log=lambda _: None)
    assert drawn == [1, 3]  # the first epoch, then not again until the last
    drawn.clear()
    train_run(tiny_cache, "m3net", 0, tmp_path / "stopped", QUICK, stop_after_epoch=2, device="cpu",
              log=lambda _: None)  # fmt: skip
    assert drawn == [1, 2] and (tmp_path / "stopped" / "curves.png").stat().st_size > 5000


def test_malignant_nodules_weigh_benign_count_over_malignant_count_in_the_loss(tiny_cache, tmp_path):
    """One step on 7 benign and 1 malignant nodule: the weight is 7, and it is in the loss the step takes."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from m3netcore.crops import default_preprocessing
    from m3netcore.train.dataset import ViewSource
    from m3netcore.train.distributed import Processes
    from m3netcore.train.trainer import Trainer

    cache = open_cache(tiny_cache)
    split = split_cache(cache, "mean-excl3", 0, seed=QUICK.seed)
    labels = split.labels_of(split.train)
    one_batch = np.sort(np.concatenate([split.train[labels == 0][:7], split.train[labels == 1][:1]]))
    split = dataclasses.replace(split, train=one_batch)  # batch 8: exactly one step per epoch
    source = ViewSource(cache, default_preprocessing(), QUICK, torch.device("cpu"))

    def first_step_bce(weight: float | None) -> tuple[float, float]:
        trainer = Trainer("m3net", split, source, QUICK, Processes(), tmp_path, lambda _: None)
        used = float(trainer.positive_weight)
        if weight is not None:
            trainer.positive_weight = torch.tensor(weight)
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            return used, float(trainer._train_epoch(0, prefetch)[1])

    used, weighted = first_step_bce(None)
    _, unweighted = first_step_bce(1.0)  # the same initial weights and views, the malignant nodule at weight 1
    assert used == pytest.approx(7.0)
    # BCE with pos_weight w exceeds the plain BCE by (w - 1) * (the malignant nodule's loss) / 8 > 0
    assert weighted > unweighted + 1e-3
