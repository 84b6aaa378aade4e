"""``m3net cv`` pools out-of-fold predictions; ``m3net evaluate`` reports metrics with patient-bootstrap CIs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from m3netcore.cli import main
from m3netcore.data.cache import open_cache
from m3netcore.evaluation.cv import cross_validate
from m3netcore.evaluation.evaluate import classification_metrics, evaluate_model
from m3netcore.metrics import roc_auc
from m3netcore.train.config import RunConfig

QUICK = RunConfig(epochs=1, batch_size=8, log_every=100, seed=2)


def _rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cv_folder(two_fold_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "cv"
    cross_validate(two_fold_cache, "m3net", out, QUICK, device="cpu", log=lambda _: None)
    return out


def test_cv_predicts_every_nodule_once_by_the_model_that_held_out_its_fold(cv_folder, two_fold_cache):
    cache = open_cache(two_fold_cache)
    oof = _rows(cv_folder / "oof.csv")
    assert sorted(r["nodule_id"] for r in oof) == sorted(r["nodule_id"] for r in cache.rows)
    fold_of = {r["nodule_id"]: r["fold"] for r in cache.rows}
    assert all(int(r["fold"]) == fold_of[r["nodule_id"]] for r in oof)
    for fold in (0, 1):
        run_rows = _rows(cv_folder / f"fold-{fold}" / "test_predictions.csv")
        assert {r["nodule_id"] for r in run_rows} == {n for n, f in fold_of.items() if f == fold}
    summary = json.loads((cv_folder / "summary.json").read_text())
    logits = np.array([float(r["logit"]) for r in oof])  # what the AUC ranks: no ties of rounded probabilities
    labels = np.array([int(r["label"]) for r in oof])
    assert summary["metrics"]["auc"]["value"] == pytest.approx(roc_auc(logits, labels))
    assert [float(r["probability"]) for r in oof] == pytest.approx(1 / (1 + np.exp(-logits)), abs=1e-6)
    assert summary["metrics"]["nodules"] == len(oof)
    low, high = summary["metrics"]["auc"]["ci"]
    assert low <= summary["metrics"]["auc"]["value"] <= high
    assert [row["fold"] for row in summary["per_fold"]] == [0, 1]
    fold_aucs = []
    for fold in (0, 1):
        rows = [r for r in oof if int(r["fold"]) == fold]
        fold_aucs.append(roc_auc(np.array([float(r["logit"]) for r in rows]), [int(r["label"]) for r in rows]))
    assert summary["mean_fold_auc"] == pytest.approx(np.mean(fold_aucs))
    assert "pooled out-of-fold predictions of 40 nodules" in (cv_folder / "summary.md").read_text()
    for row in summary["per_fold"]:  # each fold's epochs, as its metrics.csv has them
        epochs = _rows(cv_folder / f"fold-{row['fold']}" / "metrics.csv")
        assert row["training_seconds"] == pytest.approx(sum(float(r["seconds"]) for r in epochs), abs=0.05)
        assert row["training_seconds"] > 0
    assert summary["training_seconds"] == pytest.approx(sum(r["training_seconds"] for r in summary["per_fold"]))


def test_cv_continues_a_finished_folder_without_retraining(cv_folder, two_fold_cache):
    before = (cv_folder / "fold-0" / "model.safetensors").stat().st_mtime_ns
    lines = []
    cross_validate(two_fold_cache, "m3net", cv_folder, None, device="cpu", log=lines.append)
    assert (cv_folder / "fold-0" / "model.safetensors").stat().st_mtime_ns == before
    assert sum("finished earlier" in line for line in lines) == 2
    with pytest.raises(ValueError, match="other settings"):
        cross_validate(two_fold_cache, "m3net", cv_folder, QUICK.replace(epochs=2), device="cpu", log=lines.append)


def test_cv_restarts_a_fold_stopped_during_its_first_epoch(two_fold_cache, tmp_path):
    from m3netcore.train.checkpointing import CHECKPOINT_FILE
    from m3netcore.train.run import train_run

    config = QUICK.replace(epochs=2)
    cross_validate(two_fold_cache, "m3net", tmp_path / "straight", config, device="cpu", log=lambda _: None)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "cv-config.json").write_text(json.dumps(config.to_dict()))
    fold = cut / "fold-0"
    train_run(two_fold_cache, "m3net", 0, fold, config, stop_after_epoch=1, device="cpu", log=lambda _: None)
    for name in (CHECKPOINT_FILE, "metrics.csv", "curves.png"):  # as if killed during epoch 1
        (fold / name).unlink()
    lines = []
    cross_validate(two_fold_cache, "m3net", cut, None, device="cpu", log=lines.append)
    assert "fold 0: resuming" in "\n".join(lines) and "resumed" in "\n".join(lines)
    straight, again = _rows(tmp_path / "straight" / "oof.csv"), _rows(cut / "oof.csv")
    assert [(r["nodule_id"], r["probability"]) for r in straight] == [(r["nodule_id"], r["probability"]) for r in again]


def test_evaluate_a_run_reproduces_its_held_out_predictions_and_writes_the_report(cv_folder, two_fold_cache):
    run = cv_folder / "fold-1"
    report = evaluate_model(run, two_fold_cache, device="cpu")
    assert report["fold"] == 1 and report["protocol"] == "mean-excl3"
    held_out = _rows(run / "test_predictions.csv")
    evaluated = {r["nodule_id"]: float(r["probability"]) for r in _rows(run / "evaluation" / "predictions.csv")}
    assert evaluated.keys() == {r["nodule_id"] for r in held_out}
    assert all(evaluated[r["nodule_id"]] == pytest.approx(float(r["probability"]), abs=1e-5) for r in held_out)
    metrics = report["metrics"]
    labels = np.array([int(r["label"]) for r in held_out])
    assert metrics["auc"]["value"] == pytest.approx(
        roc_auc(np.array([float(r["probability"]) for r in held_out]), labels), abs=1e-4
    )
    for name in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1"):
        low, high = metrics[name]["ci"]
        assert low - 1e-9 <= metrics[name]["value"] <= high + 1e-9, name
    assert sum(map(sum, metrics["confusion"])) == len(held_out)
    for name in ("report.md", "report.json", "roc.png", "reliability.png", "confusion.png"):
        assert (run / "evaluation" / name).stat().st_size > 100, name
    assert "SEMI-SYNTHETIC" in (run / "evaluation" / "report.md").read_text()


def test_classification_metrics_on_known_values():
    probabilities = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    called = probabilities >= 0.5
    m = classification_metrics(probabilities, called, labels, ["a", "a", "b", "c", "d", "d"])
    assert m["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert m["specificity"]["value"] == pytest.approx(2 / 3)
    assert m["accuracy"]["value"] == pytest.approx(4 / 6)
    assert m["f1"]["value"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["auc"]["value"] == pytest.approx(8 / 9)
    assert m["confusion"] == [[2, 1], [1, 2]]
    assert m["patients"] == 4


def test_evaluate_bad_input_is_one_line(cv_folder, two_fold_cache, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing.safetensors"), "--data", str(two_fold_cache),
                 "--out", str(tmp_path / "e")]) == 2  # fmt: skip
    assert main(["evaluate", str(cv_folder / "fold-0"), "--data", str(two_fold_cache), "--fold", "4"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("m3net: error:") for line in errors)
    assert "--fold 4 out of range" in errors[1]


def test_evaluate_cli_on_a_model_file_defaults_to_its_held_out_fold(cv_folder, two_fold_cache, tmp_path, capsys):
    model_file = cv_folder / "fold-0" / "model.safetensors"
    assert main(["evaluate", str(model_file), "--data", str(two_fold_cache), "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "on fold 0" in printed and "balanced_accuracy" in printed and "95% CI" in printed
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["fold"] == 0 and report["metrics"]["nodules"] == 20
    assert not report["seen_in_training"] and "Warning" not in (tmp_path / "e" / "report.md").read_text()


def test_evaluate_on_a_fold_the_model_trained_on_warns(cv_folder, two_fold_cache, tmp_path, capsys):
    model_file = cv_folder / "fold-0" / "model.safetensors"
    argv = ["evaluate", str(model_file), "--data", str(two_fold_cache), "--out", str(tmp_path / "e")]
    assert main([*argv, "--fold", "1"]) == 0
    warning = "fold 1 evaluated, and the model was trained on this cache with fold 0 held out: not a held-out test"
    assert f"m3net: warning: {warning}" in capsys.readouterr().err
    assert warning in (tmp_path / "e" / "report.md").read_text()
    assert json.loads((tmp_path / "e" / "report.json").read_text())["seen_in_training"] is True


def test_cv_spread_over_two_worker_processes_matches_one_after_another(cv_folder, two_fold_cache, tmp_path, capfd):
    config = tmp_path / "quick.json"
    config.write_text(json.dumps(QUICK.to_dict()))
    out = tmp_path / "side-by-side"
    argv = ["cv", "--data", str(two_fold_cache), "--out", str(out), "--config", str(config), "--devices", "cpu,cpu",
            "--seeds", "1"]  # fmt: skip
    assert main(argv) == 0
    printed = capfd.readouterr().out
    assert "[fold 0]" in printed and "[fold 1]" in printed  # each worker's lines, tagged
    serial = _rows(cv_folder / "oof.csv")
    parallel = _rows(out / "oof.csv")
    assert [r["nodule_id"] for r in parallel] == [r["nodule_id"] for r in serial]
    # the same training in another process with one torch thread instead of two: only float rounding differs
    gaps = [abs(float(a["probability"]) - float(b["probability"])) for a, b in zip(serial, parallel, strict=True)]
    assert max(gaps) < 1e-3
    assert json.loads((out / "summary.json").read_text())["metrics"]["nodules"] == 40


_NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPUs")


@pytest.mark.parametrize(
    ("devices", "message"),
    [pytest.param("cuda:0", "no CUDA GPU", marks=_NEEDS_NO_GPU),
     pytest.param("all", "no CUDA GPU", marks=_NEEDS_NO_GPU), ("cpu,gpu", "device must be"),
     (",", "comma-separated"), ("auto,cpu", "'auto' is not one")],
)  # fmt: skip
def test_cv_refuses_devices_it_cannot_use(two_fold_cache, tmp_path, capsys, devices, message):
    assert main(["cv", "--data", str(two_fold_cache), "--out", str(tmp_path / "cv"), "--devices", devices]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("m3net: error:") and message in error and "\n" not in error
    assert not (tmp_path / "cv").exists()


def test_cv_takes_device_or_devices_not_both(two_fold_cache, tmp_path, capsys):
    argv = ["cv", "--data", str(two_fold_cache), "--out", str(tmp_path / "cv"), "--device", "cpu"]
    assert main([*argv, "--devices", "cpu,cpu"]) == 2
    assert "not both" in capsys.readouterr().err


def test_without_matplotlib_evaluate_says_why_there_are_no_figures(cv_folder, two_fold_cache, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    import sys

    import m3netcore.train
    from m3netcore.train.trainer import _plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, as without the extra
    monkeypatch.setitem(sys.modules, "m3netcore.train.plots", None)
    monkeypatch.delattr(m3netcore.train, "plots", raising=False)
    model_file = cv_folder / "fold-0" / "model.safetensors"
    assert main(["evaluate", str(model_file), "--data", str(two_fold_cache), "--out", str(tmp_path / "e")]) == 0
    assert "m3net: no PNG figures: they need matplotlib (pip install 'm3net-core[report]')" in capsys.readouterr().err
    assert not list((tmp_path / "e").glob("*.png")) and "need matplotlib" in (tmp_path / "e" / "report.md").read_text()
    assert json.loads((tmp_path / "e" / "report.json").read_text())["figures"] == []
    assert _plot([], tmp_path) is False and not (tmp_path / "curves.png").exists()


def test_cv_refuses_a_folder_whose_folds_are_of_another_model_or_cache(cv_folder, two_fold_cache, tmp_path, capsys):
    import shutil

    from .conftest import write_tiny_cache
    from .test_damaged_inputs import _copy_cache

    folder = tmp_path / "cv"
    shutil.copytree(cv_folder, folder)
    argv = ["cv", "--data", str(two_fold_cache), "--out", str(folder), "--device", "cpu", "--seeds", "1"]
    assert main([*argv, "--model", "single-micro"]) == 2  # finished m3net folds would be pooled as single-micro's
    assert "fold-0 is another run: its architecture 'm3net' (given 'single-micro')" in capsys.readouterr().err
    other = write_tiny_cache(tmp_path / "other-cache", 44, seed=1, folds=2)
    assert main(["cv", "--data", str(other), "--out", str(folder), "--device", "cpu"]) == 2
    assert f"fold-0 is another run: its data '{two_fold_cache.resolve()}' (given '{other.resolve()}', other nodules" \
        in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in cv_folder.iterdir())  # nothing written
    moved = _copy_cache(two_fold_cache, tmp_path / "moved-cache")  # the same cache elsewhere: still the folds' own
    assert main(["cv", "--data", str(moved), "--out", str(folder), "--device", "cpu", "--seeds", "1"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_subgroups_script_splits_the_out_of_fold_predictions_by_a_manifest_column(cv_folder, two_fold_cache):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "subgroups.py"
    done = subprocess.run([sys.executable, str(script), "--cv", str(cv_folder), "--data", str(two_fold_cache),
                           "--column", "fold"], capture_output=True, text=True, check=True)  # fmt: skip
    oof = _rows(cv_folder / "oof.csv")
    lines = done.stdout.splitlines()
    for fold in (0, 1):
        mine = [r for r in oof if int(r["fold"]) == fold]
        nodules, malignant, *_, called = next(line for line in lines if line.startswith(f"{fold} ")).split()[1:]
        assert int(nodules) == len(mine) and int(malignant) == sum(int(r["label"]) for r in mine)
        assert int(called) == sum(int(r["called"]) for r in mine)
    missing = subprocess.run([sys.executable, str(script), "--cv", str(cv_folder), "--data", str(two_fold_cache),
                              "--column", "nope"], capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "has no column 'nope'" in missing.stderr


def test_cv_pools_a_fold_whose_metrics_file_is_gone_and_leaves_its_time_unknown(cv_folder, two_fold_cache, tmp_path):
    import shutil

    folder = tmp_path / "cv"
    shutil.copytree(cv_folder, folder)
    (folder / "fold-1" / "metrics.csv").unlink()
    summary = cross_validate(two_fold_cache, "m3net", folder, None, device="cpu", log=lambda _: None)
    assert summary["metrics"]["nodules"] == 40
    assert summary["per_fold"][0]["training_seconds"] > 0 and summary["per_fold"][1]["training_seconds"] is None
    assert summary["training_seconds"] is None


def test_cv_with_two_seeds_averages_each_folds_recalibrated_logits(cv_folder, two_fold_cache, tmp_path):
    import shutil

    from m3netcore.evaluation.pooling import fit_recalibration

    folder = tmp_path / "cv"
    shutil.copytree(cv_folder, folder)
    lines = []
    summary = cross_validate(two_fold_cache, "m3net", folder, None, seeds=2, device="cpu", log=lines.append)
    assert sum("finished earlier" in line for line in lines) == 2  # seed 2 kept, seed 3 trained
    assert summary["seeds"] == [2, 3] and (folder / "fold-1-seed-3" / "model.safetensors").is_file()
    assert "logits averaged" in summary["pooling"] and "intercept and a temperature" in summary["pooling"]
    expected = {}
    for fold in (0, 1):  # by hand: each seed's validation logits fit its recalibration, applied to its test logits
        per_seed = []
        for run in (folder / f"fold-{fold}", folder / f"fold-{fold}-seed-3"):
            validation = _rows(run / "validation_predictions.csv")
            fit = fit_recalibration(np.array([float(r["logit"]) for r in validation]),
                                    np.array([int(r["label"]) for r in validation]))  # fmt: skip
            test = _rows(run / "test_predictions.csv")
            per_seed.append({r["nodule_id"]: float(fit(float(r["logit"]))) for r in test})
        expected |= {n: (per_seed[0][n] + per_seed[1][n]) / 2 for n in per_seed[0]}
    oof = _rows(folder / "oof.csv")
    assert max(abs(float(r["logit"]) - expected[r["nodule_id"]]) for r in oof) < 1e-5
    one_seed = json.loads((cv_folder / "summary.json").read_text())
    assert summary["single_seed"]["pooled_aucs"][0] == pytest.approx(one_seed["metrics"]["auc"]["value"])
    assert [row["seed_aucs"][0] for row in summary["per_fold"]] == pytest.approx(
        [row["auc"] for row in one_seed["per_fold"]])
    assert "| fold | nodules | AUC | AUC of each seed |" in (folder / "summary.md").read_text()


def test_evaluate_a_cv_folder_reports_pooled_metrics_and_the_figures_of_a_run(cv_folder, two_fold_cache, capsys):
    assert main(["evaluate", str(cv_folder)]) == 0  # its cache: the one the folds recorded
    printed = capsys.readouterr().out
    assert "pooled out-of-fold predictions of folds [0, 1] (40 nodules" in printed
    evaluation = cv_folder / "evaluation"
    report = json.loads((evaluation / "report.json").read_text())
    summary = json.loads((cv_folder / "summary.json").read_text())
    assert report["metrics"]["auc"] == summary["metrics"]["auc"] and report["seeds"] == [2]
    assert report["seen_in_training"] is False and report["threshold"] is None
    predicted = {r["nodule_id"]: r["probability"] for r in _rows(evaluation / "predictions.csv")}
    assert predicted == {r["nodule_id"]: r["probability"] for r in _rows(cv_folder / "oof.csv")}
    for name in ("roc.png", "reliability.png", "confusion.png"):
        assert (evaluation / name).stat().st_size > 1000, name
    text = (evaluation / "report.md").read_text()
    assert "Pooling: per-fold recalibration" in text and "| fold | nodules | AUC |" in text
    assert "each fold's own" in text and "SEMI-SYNTHETIC" in text


def test_evaluate_a_cv_folder_refuses_fold_and_protocol_and_a_run_needs_data(cv_folder, tmp_path, capsys):
    assert main(["evaluate", str(cv_folder), "--fold", "0", "--out", str(tmp_path / "e")]) == 2
    assert "leave out --fold and --protocol" in capsys.readouterr().err
    assert main(["evaluate", str(cv_folder / "fold-0"), "--out", str(tmp_path / "e")]) == 2
    assert "--data CACHE is needed" in capsys.readouterr().err


def test_evaluate_takes_a_bundled_model_by_name(two_fold_cache, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["evaluate", "demo", "--data", str(two_fold_cache), "--fold", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "demo" and report["fold"] == 1 and report["metrics"]["nodules"] == 20
    assert main(["evaluate", "no-such-model", "--data", str(two_fold_cache), "--out", str(out)]) == 2
    assert "no run folder, model file or bundled model no-such-model" in capsys.readouterr().err


def test_the_tta_benchmark_pools_as_cv_does(cv_folder, two_fold_cache):
    """benchmarks/tta.py's plain row is the cv folder's own pooled AUC, so its TTA row is compared like for like."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "tta.py"
    done = subprocess.run([sys.executable, str(script), "--cv", str(cv_folder), "--data", str(two_fold_cache)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| scoring")}  # fmt: skip
    summary = json.loads((cv_folder / "summary.json").read_text())
    assert rows["as trained (one view)"] == f"{summary['metrics']['auc']['value']:.3f}"
    assert 0.0 <= float(rows["mean logit over the 16 symmetries"]) <= 1.0
