"""Model selection: the best validation AUC, ties broken by lower validation loss, then the later epoch."""

from __future__ import annotations

import csv
import math

from m3netcore.train.config import RunConfig
from m3netcore.train.run import train_run
from m3netcore.train.selection import is_better_epoch


def _select(history: list[dict]) -> int:
    best = {"epoch": 0, "val_auc": -math.inf}
    for row in history:
        if is_better_epoch(row, best):
            best = {"epoch": row["epoch"], "val_auc": row["val_auc"], "val_loss": row["val_loss"]}
    return best["epoch"]


def test_an_auc_tie_at_one_keeps_the_epoch_of_lower_validation_loss():
    # the run: AUC 1.000 from epoch 1 while validation loss fell from 0.639 to 0.055
    losses = [0.639, 0.41, 0.22, 0.11, 0.055]
    history = [{"epoch": e + 1, "val_auc": 1.0, "val_loss": loss} for e, loss in enumerate(losses)]
    assert _select(history) == 5
    history[3]["val_loss"] = 0.05  # a later rise of the loss keeps the earlier, lower one
    assert _select(history) == 4


def test_higher_auc_wins_over_lower_loss_and_equal_numbers_keep_the_later_epoch():
    assert is_better_epoch({"val_auc": 0.9, "val_loss": 0.9}, {"val_auc": 0.8, "val_loss": 0.1})
    assert not is_better_epoch({"val_auc": 0.8, "val_loss": 0.1}, {"val_auc": 0.9, "val_loss": 0.9})
    assert is_better_epoch({"val_auc": 0.8, "val_loss": 0.3}, {"val_auc": 0.8, "val_loss": 0.3})
    assert not is_better_epoch({"val_auc": 0.8, "val_loss": 0.31}, {"val_auc": 0.8, "val_loss": 0.3})


def test_non_finite_numbers_never_win_and_an_old_checkpoints_best_without_loss_loses_ties():
    first = {"val_auc": -math.inf}
    assert not is_better_epoch({"val_auc": math.nan, "val_loss": 0.1}, first)
    assert not is_better_epoch({"val_auc": 0.7, "val_loss": math.nan}, first)
    assert is_better_epoch({"val_auc": 0.7, "val_loss": 0.4}, first)
    assert is_better_epoch({"val_auc": 0.7, "val_loss": 5.0}, {"val_auc": 0.7})  # best saved before val_loss


def test_the_trainer_selects_by_the_rule_when_validation_auc_ties(tiny_cache, tmp_path):
    # the tiny cache is easy: validation AUC is 1.000 from the first epoch while the loss falls
    summary = train_run(tiny_cache, "m3net", 0, tmp_path / "run", RunConfig(epochs=4, batch_size=8), device="cpu",
                        log=lambda line: None)  # fmt: skip
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        history = [{k: float(v) for k, v in row.items() if k in ("epoch", "val_auc", "val_loss")}
                   for row in csv.DictReader(f)]  # fmt: skip
    assert history[0]["val_auc"] == history[1]["val_auc"] == 1.0  # the case of the issue
    tied = [row for row in history if row["val_auc"] == max(r["val_auc"] for r in history)]
    expected = min(tied, key=lambda row: (row["val_loss"], -row["epoch"]))["epoch"]
    assert expected != 1  # strict '>' on AUC alone would have kept epoch 1
    assert summary["best_epoch"] == expected
