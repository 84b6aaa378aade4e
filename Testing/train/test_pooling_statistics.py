"""The statistics behind the accuracy table: per-fold recalibration before pooling, seed ensembles, paired intervals.

Small generated scores with known answers; no training (each test well under a second or two).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from m3netcore.data.manifest import rows_to_csv
from m3netcore.evaluation.comparison import paired_auc_difference, paired_by_nodule, spread
from m3netcore.evaluation.cv import pool_cross_validation, seed_run_folder
from m3netcore.evaluation.pooling import fit_recalibration, sigmoid
from m3netcore.metrics import roc_auc
from m3netcore.train.config import RunConfig


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, ``label + noise`` and pure noise, for ``n`` nodules of ``n // 2`` patients."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    informative = labels + rng.normal(0.0, 0.7, n)
    noise = rng.normal(0.0, 1.0, n)
    return labels, informative, noise


def test_paired_interval_excludes_zero_when_one_score_is_the_label_plus_noise_and_the_other_noise():
    labels, informative, noise = _scores(300, seed=1)
    patients = [f"P{i // 2}" for i in range(300)]
    better = paired_auc_difference(informative, noise, labels, patients)
    assert better["difference"] == pytest.approx(roc_auc(informative, labels) - roc_auc(noise, labels))
    assert better["difference"] > 0.2 and better["ci"][0] > 0 and better["excludes_zero"]
    worse = paired_auc_difference(noise, informative, labels, patients)
    assert worse["ci"][1] < 0 and worse["difference"] == pytest.approx(-better["difference"])
    other_noise = np.random.default_rng(7).normal(0.0, 1.0, 300)
    level = paired_auc_difference(noise, other_noise, labels, patients)
    assert level["ci"][0] < 0 < level["ci"][1] and not level["excludes_zero"]


def test_paired_interval_resamples_patients_not_nodules():
    # Ten identical copies of each of 40 patients' nodules hold no more information than one copy: resampling
    # patients gives the same width; resampling nodules would shrink it by about sqrt(10).
    labels, informative, noise = _scores(40, seed=3)
    once = paired_auc_difference(informative, noise, labels, [f"P{i}" for i in range(40)])
    copies = paired_auc_difference(np.repeat(informative, 10), np.repeat(noise, 10), np.repeat(labels, 10),
                                   [f"P{i}" for i in range(40) for _ in range(10)])  # fmt: skip
    width_once, width_copies = np.diff(once["ci"])[0], np.diff(copies["ci"])[0]
    assert copies["difference"] == pytest.approx(once["difference"])
    assert width_copies == pytest.approx(width_once, rel=0.25)


def test_paired_by_nodule_pairs_by_id_whatever_the_order():
    labels, informative, noise = _scores(100, seed=5)
    ids = [f"N{i}" for i in range(100)]
    a = dict(zip(ids, informative, strict=True))
    b = dict(reversed(list(zip(ids, noise, strict=True))))
    paired = paired_by_nodule(a, b, dict(zip(ids, labels, strict=True)), {n: n for n in ids})
    assert paired["difference"] == pytest.approx(roc_auc(informative, labels) - roc_auc(noise, labels))
    with pytest.raises(ValueError, match="one length"):
        paired_auc_difference(informative, noise[:-1], labels, ids)


def test_recalibration_recovers_a_known_slope_and_intercept():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 20000)
    labels = (rng.random(20000) < sigmoid(0.5 * logits - 1.0)).astype(int)
    fit = fit_recalibration(logits, labels)
    assert fit.slope == pytest.approx(0.5, abs=0.04) and fit.intercept == pytest.approx(-1.0, abs=0.06)
    assert fit.to_dict()["temperature"] == pytest.approx(2.0, rel=0.1)
    separable = fit_recalibration(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 0, 1, 1]))
    assert 0 < separable.slope <= 20 and np.isfinite(separable.intercept)
    with pytest.raises(ValueError, match="both classes"):
        fit_recalibration(np.array([0.1, 0.2]), np.array([1, 1]))


def _write_fold(run, fold: int, nodules: list[str], labels, test_logits, validation_labels, validation_logits,
                seed: int) -> None:  # fmt: skip
    """A finished fold run's files as `m3net train` writes them (what pooling reads)."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(RunConfig(seed=seed).to_dict()))
    test = [{"nodule_id": n, "patient_id": n, "fold": fold, "label": int(y), "logit": float(z),
             "probability": float(sigmoid(z)), "threshold": 0.5, "called": int(z >= 0)}
            for n, y, z in zip(nodules, labels, test_logits, strict=True)]  # fmt: skip
    (run / "test_predictions.csv").write_text(rows_to_csv(test))
    validation = [{"nodule_id": f"v{i}", "patient_id": f"v{i}", "label": int(y), "logit": float(z)}
                  for i, (y, z) in enumerate(zip(validation_labels, validation_logits, strict=True))]  # fmt: skip
    (run / "validation_predictions.csv").write_text(rows_to_csv(validation))


def test_per_fold_recalibration_pools_two_folds_with_shifted_logits_to_their_own_auc(tmp_path):
    # Both folds' models rank by the same latent score; fold 1's logits are stretched and shifted (3 s + 4).
    # Pooled as each run calibrated itself, fold 1's benign nodules outrank fold 0's malignant ones; recalibrated
    # on each fold's validation split, the pooled AUC is the folds' own.
    rng = np.random.default_rng(11)
    fake_cache = types.SimpleNamespace(path=str(tmp_path / "cache"), info={"kind": "test"}, semi_synthetic=True,
                                       rows=[])  # fmt: skip
    latent_all, labels_all = [], []
    validation_latent = rng.normal(0, 1.5, 400)  # one validation draw for both folds: exact known recalibrations
    validation_labels = (rng.random(400) < sigmoid(2 * validation_latent)).astype(int)
    validation_noises = rng.normal(0, 0.5, (2, 400))
    for fold, (scale, shift) in enumerate([(1.0, 0.0), (3.0, 4.0)]):
        latent = rng.normal(0, 1.5, 400)
        labels = (rng.random(400) < sigmoid(2 * latent)).astype(int)
        labels_all.append(labels)
        seed_scores = []
        for k, seed in enumerate((0, 1)):  # two seeds: the latent score with each seed's own noise
            noise, validation_noise = rng.normal(0, 0.5, 400), validation_noises[k]
            seed_scores.append(latent + noise)
            _write_fold(seed_run_folder(tmp_path / "cv", fold, k, seed), fold, [f"f{fold}n{i}" for i in range(400)],
                        labels, scale * (latent + noise) + shift, validation_labels,
                        scale * (validation_latent + validation_noise) + shift, seed)  # fmt: skip
        latent_all.append(np.mean(seed_scores, axis=0))  # the ensemble's score on one scale for both folds
    summary, oof = pool_cross_validation(tmp_path / "cv", fake_cache, [0, 1], [0, 1])
    fold_aucs = [row["auc"] for row in summary["per_fold"]]
    pooled = summary["metrics"]["auc"]["value"]
    assert pooled == pytest.approx(np.mean(fold_aucs), abs=0.01)
    assert pooled == pytest.approx(roc_auc(np.concatenate(latent_all), np.concatenate(labels_all)), abs=0.01)
    assert summary["pooled_auc_as_each_run_calibrated_itself"] < pooled - 0.05
    assert summary["seeds"] == [0, 1] and "intercept and a temperature" in summary["pooling"]
    for row in summary["per_fold"]:  # averaging two seeds' noise ranks better than a seed alone, on average
        assert row["auc"] > np.mean(row["seed_aucs"]) + 0.005
    first, second = (row["recalibration"][0] for row in summary["per_fold"])
    assert first["slope"] / second["slope"] == pytest.approx(3.0, rel=0.01)  # undoes the stretch ...
    assert second["intercept"] + 4.0 * second["slope"] == pytest.approx(first["intercept"], abs=0.01)  # ... and shift
    assert summary["single_seed"]["pooled_auc"]["n"] == 2 and summary["single_seed"]["pooled_auc"]["mean"] < pooled
    assert summary["fold_auc"] == spread(fold_aucs)
    assert len(oof) == 800 and list(oof[0])[:6] == ["nodule_id", "patient_id", "fold", "label", "logit", "probability"]
    assert summary["metrics"]["confusion"][1][1] == sum(r["called"] and r["label"] for r in oof)


def test_spread_of_fold_aucs():
    assert spread([0.8, 0.9, None]) == pytest.approx({"mean": 0.85, "sd": np.std([0.8, 0.9], ddof=1), "min": 0.8,
                                                      "max": 0.9, "n": 2})  # fmt: skip
    assert spread([0.7])["sd"] == 0.0 and spread([])["mean"] is None
