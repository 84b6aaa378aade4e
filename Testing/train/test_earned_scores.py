"""Training never reports a score it did not earn: folds by patient, resume of this run only, no NaN, no seen "test".

Real caches (generated cubes), real runs of one short epoch, the real ``m3net`` command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m3netcore.checkpoint import load_model, save_model
from m3netcore.cli import main
from m3netcore.data.manifest import read_rows_csv, rows_to_csv
from m3netcore.train.checkpointing import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from m3netcore.train.config import RunConfig
from m3netcore.train.run import train_run

from .conftest import write_tiny_cache

ONE_EPOCH = RunConfig(epochs=2, batch_size=8, log_every=100, seed=2)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """40 nodules of 20 patients in two folds."""
    return write_tiny_cache(tmp_path_factory.mktemp("earned") / "cache", 40, seed=3, folds=2)


def _error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("m3net: error: "), error
    return error


# --- folds are by patient ---------------------------------------------------------------------


def test_a_manifest_that_puts_a_patient_in_two_folds_is_refused(cache, tmp_path, capsys) -> None:
    leaky = tmp_path / "leaky"
    shutil.copytree(cache, leaky)
    rows = read_rows_csv(leaky / "manifest.csv")
    patient = rows[1]["patient_id"]
    assert rows[0]["patient_id"] == patient and rows[0]["fold"] == rows[1]["fold"] == 0
    rows[1]["fold"] = 1  # one of the patient's two nodules moved to the other fold
    (leaky / "manifest.csv").write_text(rows_to_csv(rows))

    assert main(["train", "--data", str(leaky), "--fold", "0", "--out", str(tmp_path / "run")]) == 2
    error = _error_line(capsys)
    assert f"patient '{patient}' is in fold 1 here and in fold 0 on line 2" in error
    assert not (tmp_path / "run").exists()


# --- --resume continues this run only ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_runs(cache, tmp_path_factory) -> dict[str, Path]:
    """Runs stopped after their first epoch: this one (fold 0, seed 2) and others that differ in one thing."""
    root = tmp_path_factory.mktemp("stopped")
    other_cache = write_tiny_cache(root / "other-cache", 48, seed=4, folds=2)  # more nodules: another cache
    runs = {
        "this": (cache, "m3net", 0, ONE_EPOCH),
        "fold": (cache, "m3net", 1, ONE_EPOCH),
        "seed": (cache, "m3net", 0, ONE_EPOCH.replace(seed=5)),
        "architecture": (cache, "single-micro", 0, ONE_EPOCH),
        "cache_digest": (other_cache, "m3net", 0, ONE_EPOCH),
        "setting learning_rate": (cache, "m3net", 0, ONE_EPOCH.replace(learning_rate=1e-4)),
    }
    for name, (data, model, fold, config) in runs.items():
        train_run(data, model, fold, root / name, config, stop_after_epoch=1, device="cpu", log=_quiet)
    return {name: root / name for name in runs}


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ("fold", "its fold 1 (this run's 0)"),
        ("seed", "seed 5 (this run's 2)"),
        ("architecture", "architecture 'single-micro' (this run's 'm3net')"),
        ("cache_digest", "cache_digest '"),
        ("setting learning_rate", "setting learning_rate 0.0001 (this run's 0.002)"),
    ],
)
def test_resume_refuses_the_checkpoint_of_another_run(stopped_runs, cache, tmp_path, capsys, other, message) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped_runs["this"], run)
    shutil.copy(
        stopped_runs[other] / CHECKPOINT_FILE, run / CHECKPOINT_FILE
    )  # split.json and config.json stay this run's

    assert main(["train", "--data", str(cache), "--fold", "0", "--out", str(run), "--resume", "--device", "cpu"]) == 2
    error = _error_line(capsys)
    assert "is another run's checkpoint" in error and message in error
    assert not (run / "model.safetensors").exists() and not (run / "test_predictions.csv").exists()


def test_resume_refuses_a_checkpoint_that_does_not_say_whose_it_is(stopped_runs, cache, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped_runs["this"], run)
    state = load_checkpoint(run / CHECKPOINT_FILE)
    del state["run"]  # as written before checkpoints recorded their run
    save_checkpoint(run / CHECKPOINT_FILE, state)

    assert main(["train", "--data", str(cache), "--fold", "0", "--out", str(run), "--resume", "--device", "cpu"]) == 2
    assert "does not record which run wrote it" in _error_line(capsys)


# --- divergence -----------------------------------------------------------------------------------


def test_a_run_whose_loss_goes_nan_stops_with_one_line_and_writes_no_predictions(cache, tmp_path, capsys) -> None:
    settings = tmp_path / "diverge.json"
    settings.write_text(json.dumps({"learning_rate": 1e30, "batch_size": 8, "epochs": 2, "log_every": 100}))
    run = tmp_path / "run"

    code = main(["train", "--data", str(cache), "--fold", "0", "--out", str(run), "--config", str(settings),
                 "--device", "cpu"])  # fmt: skip

    assert code == 2
    assert "training diverged in epoch 1" in _error_line(capsys)
    written = {p.name for p in run.iterdir()}
    assert not written & {"test_predictions.csv", "model.safetensors", CHECKPOINT_FILE, "metrics.csv"}, written


# --- evaluate knows a model's own training data by content --------------------------------------------


@pytest.fixture(scope="module")
def fold0_model(cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fold0") / "run"
    train_run(cache, "m3net", 0, run, ONE_EPOCH.replace(epochs=1), device="cpu", log=_quiet)
    return run / "model.safetensors"


def test_evaluate_recognises_its_training_cache_moved_elsewhere(fold0_model, cache, tmp_path, capsys) -> None:
    moved = tmp_path / "somewhere-else"
    shutil.copytree(cache, moved)
    copied_model = tmp_path / "copied.safetensors"
    shutil.copy(fold0_model, copied_model)

    assert (
        main(["evaluate", str(copied_model), "--data", str(moved), "--fold", "1", "--out", str(tmp_path / "e1")]) == 0
    )
    assert "not a held-out test" in capsys.readouterr().err
    report = json.loads((tmp_path / "e1" / "report.json").read_text())
    assert report["seen_in_training"] and report["recognised_by"] == "cache digest"
    assert report["seen_patients"] == report["metrics"]["patients"] == 10

    assert (
        main(["evaluate", str(copied_model), "--data", str(moved), "--fold", "0", "--out", str(tmp_path / "e0")]) == 0
    )
    assert "not a held-out test" not in capsys.readouterr().err  # the fold it held out is a fair test
    assert not json.loads((tmp_path / "e0" / "report.json").read_text())["seen_in_training"]


def test_evaluate_recognises_training_patients_in_another_cache(fold0_model, tmp_path, capsys) -> None:
    """The same patients' nodules drawn again with two more patients (another cache): not held out either."""
    redrawn = write_tiny_cache(tmp_path / "redrawn", 44, seed=9, folds=2)

    assert (
        main(["evaluate", str(fold0_model), "--data", str(redrawn), "--fold", "1", "--out", str(tmp_path / "e")]) == 0
    )
    assert "10 of the 11 patients evaluated trained or selected this model: not a held-out test" in (
        capsys.readouterr().err
    )
    assert json.loads((tmp_path / "e" / "report.json").read_text())["recognised_by"] is None


def test_a_model_file_without_a_cache_digest_is_recognised_by_its_counts(fold0_model, cache, tmp_path) -> None:
    """Files made before the digest was kept (the bundled lidc-phantom 0.2.0) record their split's counts."""
    from m3netcore.evaluation.evaluate import evaluate_model

    model = load_model(fold0_model)
    model.metadata = {"training": {k: v for k, v in model.metadata["training"].items() if k != "cache_digest"}}
    model.metadata["training"]["data"] = "/nowhere/else"
    old_style = tmp_path / "old-style.safetensors"
    save_model(model, old_style)
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)

    report = evaluate_model(old_style, moved, fold=1, out=tmp_path / "e", device="cpu")

    assert report["recognised_by"] == "nodule counts" and report["seen_in_training"]


def test_the_bundled_lidc_phantom_model_holds_fold_0_out_and_knows_its_cache_by_content() -> None:
    """lidc-phantom 0.3.0 trained on folds 1-4: fold 0 of the phantom it was made from is an honest test of it."""
    model = load_model("lidc-phantom")
    training = model.metadata["training"]
    assert (model.version, training["fold"], training["trained_folds"]) == ("0.3.0", 0, [1, 2, 3, 4])
    assert training["split"]["test"]["nodules"] == 400 and len(model.metadata["trained_on"]["patients_sha256"]) > 400
    assert "Fold 0 (400 nodules of its own patients) was held out" in model.card and "SEMI-SYNTHETIC" in model.card
    # it is known by the digest of its cache's content, not by counts (as 0.2.0 was): another phantom is not its own
    assert isinstance(training["cache_digest"], str) and len(training["cache_digest"]) >= 16
