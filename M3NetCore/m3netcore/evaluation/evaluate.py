"""``m3net evaluate``: a model on a cache's held-out nodules, with patient-bootstrap intervals and figures.

Metrics: AUC, and at the model's threshold accuracy, sensitivity, specificity, balanced
accuracy and F1, each with a 95% interval from resampling patients (the nodules of a
patient are not independent); expected calibration error with a reliability diagram;
ROC curve and confusion matrix. Written as ``report.md``, ``report.json``,
``predictions.csv`` and PNGs in the output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import Model, load_model
from m3netcore.data.baselines import _with_interval as patient_bootstrap  # one bootstrap for every table
from m3netcore.data.cache import cache_digest, open_cache
from m3netcore.data.labels import DEFAULT_PROTOCOL, check_protocol
from m3netcore.data.manifest import rows_to_csv
from m3netcore.errors import M3NetInputError
from m3netcore.metrics import expected_calibration_error, roc_auc
from m3netcore.train import NO_FIGURES
from m3netcore.train.config import RunConfig
from m3netcore.train.dataset import ViewSource, cache_folds

CALLED_METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1")


def classification_metrics(
    probabilities: np.ndarray, called: np.ndarray, labels: np.ndarray, patients: Sequence[str], *, seed: int = 0,
    scores: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """AUC and the called-label metrics, each ``{"value", "ci"}`` (95%, patient bootstrap), plus ECE and counts.

    Args:
        probabilities: calibrated probabilities of malignancy.
        called: 0/1 calls (probability at or above each model's threshold).
        labels: 0/1 truth.
        patients: each nodule's patient id (the resampling unit).
        scores: what the AUC ranks, if not the probabilities: the logits, which do not tie where
            probabilities round to 0 or 1.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    ranked = probabilities if scores is None else np.asarray(scores, dtype=np.float64)
    called = np.asarray(called).astype(bool)
    labels = np.asarray(labels).astype(bool)
    patients = np.asarray([str(p) for p in patients])
    if labels.size == 0:
        raise M3NetInputError("no labelled nodules to evaluate")
    functions = {
        "auc": lambda idx: roc_auc(ranked[idx], labels[idx]),
        "accuracy": lambda idx: float(np.mean(called[idx] == labels[idx])),
        "sensitivity": lambda idx: _rate(called[idx], labels[idx]),
        "specificity": lambda idx: _rate(~called[idx], ~labels[idx]),
        "balanced_accuracy": lambda idx: 0.5 * (_rate(called[idx], labels[idx]) + _rate(~called[idx], ~labels[idx])),
        "f1": lambda idx: _f1(called[idx], labels[idx]),
    }
    metrics = {}
    for name, function in functions.items():
        try:
            value, interval = patient_bootstrap(function, patients, seed)
        except ValueError:  # e.g. AUC of one class: not defined
            value, interval = float("nan"), [float("nan"), float("nan")]
        metrics[name] = {"value": value, "ci": interval}
    matrix = np.array(
        [[np.sum(~labels & ~called), np.sum(~labels & called)], [np.sum(labels & ~called), np.sum(labels & called)]]
    )
    return metrics | {
        "ece": expected_calibration_error(probabilities, labels),
        "confusion": matrix.tolist(),
        "nodules": int(labels.size),
        "malignant": int(labels.sum()),
        "patients": int(np.unique(patients).size),
    }


def evaluate_model(
    model_or_run: str | os.PathLike,
    data: str | os.PathLike,
    *,
    fold: int | None = None,
    out: str | os.PathLike | None = None,
    protocol: str | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate a model file, a run folder's model or a bundled model (by name) on a cache; write the report.

    The fold defaults to the one the run held out; without a fold every labelled nodule is
    used, which is only a fair test for data the model never trained on (the report says so).
    """
    from m3netcore.predict import resolve_device

    source_path = Path(model_or_run)
    if not source_path.exists():
        from m3netcore.checkpoint import bundled_registry

        if str(model_or_run) not in bundled_registry():
            raise M3NetInputError(f"no run folder, model file or bundled model {source_path}")
        # a bundled model by name ("lidc-phantom"): the checksummed file that ships with the package
        model_or_run = str(model_or_run)
        if out is None:
            raise M3NetInputError("evaluating a bundled model needs --out DIR")
        model_path, out = model_or_run, Path(out)
    elif source_path.is_dir():
        model_path = source_path / "model.safetensors"
        if not model_path.is_file():
            raise M3NetInputError(f"{source_path} holds no model.safetensors (is the run finished?)")
        out = Path(out) if out is not None else source_path / "evaluation"
    else:
        model_path = source_path
        if out is None:
            raise M3NetInputError("evaluating a model file needs --out DIR")
        out = Path(out)
    model = load_model(model_path)
    training = model.metadata.get("training", {})
    protocol = protocol or training.get("protocol") or DEFAULT_PROTOCOL
    try:
        check_protocol(protocol)
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
    cache = open_cache(data)
    held_out = training.get("fold")
    if fold is None and held_out is not None:
        fold = int(held_out)
    if fold is not None and fold not in cache_folds(cache):
        raise M3NetInputError(f"--fold {fold} out of range: {cache.path} has folds {cache_folds(cache)}")
    column = f"label_{protocol}"
    chosen = np.asarray(
        [i for i, row in enumerate(cache.rows)
         if row.get(column) is not None and (fold is None or row["fold"] == fold)],
        dtype=np.int64,
    )  # fmt: skip
    if chosen.size == 0:
        raise M3NetInputError(f"no nodules labelled under {protocol} in fold {fold} of {cache.path}")
    probabilities = predict_probabilities(model, cache, chosen, device=resolve_device(device))
    labels = np.asarray([cache.rows[i][column] for i in chosen], dtype=np.int64)
    patients = [cache.rows[i]["patient_id"] for i in chosen]
    called = probabilities >= model.threshold
    metrics = classification_metrics(probabilities, called, labels, patients)
    recognised_by = trained_on_this_cache(model, cache, protocol)
    seen_patients = patients_seen_in_training(model, patients)
    report = {
        "model": str(model_path), "model_name": model.name, "architecture": model.architecture,
        "data": str(cache.path), "data_kind": cache.info.get("kind"), "semi_synthetic": cache.semi_synthetic,
        "protocol": protocol, "fold": fold, "threshold": model.threshold, "temperature": model.temperature,
        "trained_on_this_data": recognised_by is not None, "recognised_by": recognised_by,
        "metrics": metrics,
    }  # fmt: skip
    # on its own cache a model is tested fairly only on the fold it held out
    report["held_out_fold"] = held_out
    report["seen_patients"] = seen_patients
    report["seen_in_training"] = bool(seen_patients) or (
        report["trained_on_this_data"] and (held_out is None or fold != int(held_out))
    )
    rows = [
        {"nodule_id": cache.rows[i]["nodule_id"], "patient_id": cache.rows[i]["patient_id"],
         "fold": cache.rows[i]["fold"], "label": int(y), "probability": round(float(p), 6), "called": int(c)}
        for i, y, p, c in zip(chosen, labels, probabilities, called, strict=True)
    ]  # fmt: skip
    return write_report(report, probabilities, labels, out, predictions=rows)


def evaluate_cross_validation(
    folder: str | os.PathLike, *, data: str | os.PathLike | None = None, out: str | os.PathLike | None = None
) -> dict:
    """Pooled out-of-fold metrics of an ``m3net cv`` folder, with intervals, and the figures of a single run.

    Every seed that every fold has finished takes part; each fold model is recalibrated on
    its own validation split before pooling (:mod:`m3netcore.evaluation.pooling`). ``data``: the
    cache (default: the one its folds trained on, found by the path they recorded); it must
    be the folds' own, by content. Writes ``report.md``, ``report.json``,
    ``predictions.csv`` and the figures into ``out`` (default ``folder/evaluation``).

    Raises:
        M3NetInputError: not a cv folder, no finished fold, or another cache.
    """
    from m3netcore.evaluation.cv import (
        CV_CONFIG_FILE,
        finished_seeds,
        format_difference,
        format_spread,
        is_cross_validation,
        pool_cross_validation,
        seed_run_folder,
    )
    from m3netcore.train.config import read_json_mapping
    from m3netcore.train.run import check_same_run

    folder = Path(folder)
    if not is_cross_validation(folder):
        raise M3NetInputError(f"{folder} is not an `m3net cv` folder (no {CV_CONFIG_FILE})")
    folds, seeds = finished_seeds(folder)
    first = read_json_mapping(seed_run_folder(folder, folds[0], 0, seeds[0]) / "split.json")
    cache = open_cache(data if data is not None else first.get("data", ""))
    missing = sorted(set(cache_folds(cache)) - set(folds))
    if missing:
        raise M3NetInputError(f"{folder}: folds {missing} of {cache.path} are not finished; run `m3net cv` again")
    architecture = str(first.get("architecture"))
    for fold in folds:
        for k, seed in enumerate(seeds):
            check_same_run(seed_run_folder(folder, fold, k, seed), architecture, fold, cache, doing="m3net evaluate")
    summary, rows = pool_cross_validation(folder, cache, seeds, folds)
    probabilities = np.asarray([row["probability"] for row in rows], dtype=np.float64)
    labels = np.asarray([row["label"] for row in rows], dtype=np.int64)
    notes = [f"Pooling: {summary['pooling']}.", f"Seeds per fold: {len(seeds)} ({', '.join(map(str, seeds))}).",
             f"Per-fold AUC: {format_spread(summary['fold_auc'])}.",
             f"Pooled as each run calibrated itself (seed {seeds[0]}, no recalibration): "
             f"AUC {summary['pooled_auc_as_each_run_calibrated_itself']:.3f}."]  # fmt: skip
    if len(seeds) > 1:
        notes.append(f"Single seeds: pooled AUC {format_spread(summary['single_seed']['pooled_auc'], extent=False)}.")
    if summary.get("versus_diameter"):
        notes.append(f"Paired AUC difference to the diameter-only regression, same nodules: "
                     f"{format_difference(summary['versus_diameter'])} (95% CI, patient bootstrap).")  # fmt: skip
    report = {
        "model": str(folder), "model_name": f"cross-validation of {architecture}", "architecture": architecture,
        "data": str(cache.path), "data_kind": cache.info.get("kind"), "semi_synthetic": cache.semi_synthetic,
        "protocol": summary["protocol"], "fold": None, "threshold": None,
        "where": f"pooled out-of-fold predictions of folds {folds}", "seeds": seeds, "pooling": summary["pooling"],
        "per_fold": summary["per_fold"], "fold_auc": summary["fold_auc"], "single_seed": summary["single_seed"],
        "versus_diameter": summary["versus_diameter"], "notes": notes,
        "pooled_auc_as_each_run_calibrated_itself": summary["pooled_auc_as_each_run_calibrated_itself"],
        # every nodule was predicted by the models that held its fold out, selected and calibrated without it
        "trained_on_this_data": False, "seen_in_training": False, "held_out_fold": None, "seen_patients": 0,
        "metrics": summary["metrics"],
    }  # fmt: skip
    return write_report(report, probabilities, labels, Path(out) if out is not None else folder / "evaluation",
                        predictions=rows)  # fmt: skip


def trained_on_this_cache(model: Model, cache, protocol: str) -> str | None:
    """How the model is known to have been trained on ``cache`` (by content), or None.

    - ``"cache digest"``: the model file records the digest of the cache it trained on
      (:func:`m3netcore.data.cache.cache_digest`: nodules, patients, folds, labels, grids),
      whatever path either has now;
    - ``"nodule counts"``: files from before the digest was kept (the bundled
      ``lidc-phantom`` 0.2.0) record the kind of cache and how many nodules, and how many
      malignant, trained, validated and were held out; the same kind of cache with exactly
      those counts under the model's protocol is taken for its own;
    - ``"path"``: the cache is where the model's training cache was.
    """
    training = model.metadata.get("training", {}) if isinstance(model.metadata, dict) else {}
    if not isinstance(training, dict):
        return None
    if training.get("cache_digest") is not None:
        return "cache digest" if training["cache_digest"] == cache_digest(cache) else None
    split = training.get("split")
    if isinstance(split, dict) and training.get("data_kind") == cache.info.get("kind"):
        column = f"label_{training.get('protocol', protocol)}"
        labels = [row[column] for row in cache.rows if row.get(column) is not None]
        try:
            parts = [split[part] for part in ("train", "validation", "test")]
            nodules, malignant = sum(int(p["nodules"]) for p in parts), sum(int(p["malignant"]) for p in parts)
        except (KeyError, TypeError, ValueError):
            nodules = malignant = -1
        if labels and (nodules, malignant) == (len(labels), sum(labels)):
            return "nodule counts"
    data = training.get("data")
    if isinstance(data, str) and Path(data).resolve() == Path(cache.path).resolve():
        return "path"
    return None


def patients_seen_in_training(model: Model, patients: Sequence[str]) -> int:
    """How many of ``patients`` trained or selected the model (the model file keeps their hashed ids)."""
    from m3netcore.train.run import patient_hash

    trained_on = model.metadata.get("trained_on", {}) if isinstance(model.metadata, dict) else {}
    known = trained_on.get("patients_sha256") if isinstance(trained_on, dict) else None
    if not isinstance(known, list):
        return 0
    known = set(known)
    return len({p for p in patients if patient_hash(p) in known})


@torch.inference_mode()
def predict_probabilities(model: Model, cache, indices: np.ndarray, *, device: torch.device,
                          batch_size: int = 64) -> np.ndarray:  # fmt: skip
    """Calibrated probabilities of the cached nodules' untransformed views (what inference sees)."""
    source = ViewSource(cache, model.preprocessing, RunConfig(), device)
    network = model.network.to(device).eval()
    logits = []
    for start in range(0, len(indices), batch_size):
        logits.append(network(source.views(indices[start : start + batch_size])).logit.float().cpu())
    z = torch.cat(logits).double().numpy()
    return 1.0 / (1.0 + np.exp(-z / model.temperature))


def write_report(report: dict, probabilities: np.ndarray, labels: np.ndarray, out: str | os.PathLike,
                 *, predictions: Sequence[dict] | None = None) -> dict:  # fmt: skip
    """``report.json``, ``report.md``, ``predictions.csv`` and the figures (when matplotlib is there).

    Returns the report as written: with the figures' names, or why there are none.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = report["metrics"]
    figures = []
    try:
        from m3netcore.train import plots
    except ImportError:
        plots = None
    if plots is not None:
        if len(set(np.asarray(labels).tolist())) == 2:
            operating_point = (1.0 - metrics["specificity"]["value"], metrics["sensitivity"]["value"])
            plots.plot_roc(probabilities, labels, metrics["auc"]["value"], out / "roc.png",
                           operating_point=operating_point)  # fmt: skip
            figures.append("roc.png")
        plots.plot_reliability(probabilities, labels, metrics["ece"], out / "reliability.png")
        threshold = report.get("threshold", 0.5)
        plots.plot_confusion(np.asarray(metrics["confusion"]), "each fold's threshold" if threshold is None else
                             float(threshold), out / "confusion.png")  # fmt: skip
        figures += ["reliability.png", "confusion.png"]
    report = report | {"figures": figures} | ({} if plots is not None else {"figures_missing": NO_FIGURES})
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, allow_nan=True) + "\n")
    write_text_atomic(out / "report.md", markdown_report(report))
    if predictions:
        write_text_atomic(out / "predictions.csv", rows_to_csv(predictions))
    return report


def seen_warning(report: dict) -> str:
    """Why a report on nodules the model trained or was selected on is not a held-out test."""
    if not report.get("trained_on_this_data"):
        return (f"{report.get('seen_patients')} of the {report['metrics']['patients']} patients evaluated trained or "
                "selected this model: not a held-out test")  # fmt: skip
    where = "every nodule" if report.get("fold") is None else f"fold {report['fold']}"
    return (f"{where} evaluated, and the model was trained on this cache with "
            f"{'no fold' if report.get('held_out_fold') is None else 'fold ' + str(report['held_out_fold'])} held "
            "out: not a held-out test")


def markdown_report(report: dict) -> str:
    metrics = report["metrics"]
    where = report.get("where") or ("all labelled nodules" if report.get("fold") is None else f"fold {report['fold']}")
    lines = [f"# Evaluation of {report.get('model_name', report.get('model'))}", ""]
    if report.get("semi_synthetic"):
        kind = report.get("data_kind")
        lines += [f"**SEMI-SYNTHETIC data ({kind}): these numbers are not about CT of patients.**", ""]
    if report.get("seen_in_training"):
        lines += [f"**Warning: {seen_warning(report)}**", ""]
    lines += [
        f"- Data: `{report['data']}` ({report.get('data_kind')}), {where}, protocol {report['protocol']}",
        f"- {metrics['nodules']} nodules ({metrics['malignant']} malignant) of {metrics['patients']} patients",
        f"- Threshold {report['threshold']:.3f} on the calibrated probability" if report.get("threshold") is not None
        else "- Thresholds: each fold's own, of best balanced accuracy on its validation split",
        *(f"- {line}" for line in report.get("notes", [])),
        "",
        "| metric | value | 95% CI (patient bootstrap) |",
        "|---|---|---|",
    ]
    for name in ("auc", *CALLED_METRICS):
        value, (low, high) = metrics[name]["value"], metrics[name]["ci"]
        lines.append(f"| {name.replace('_', ' ')} | {value:.3f} | {low:.3f} - {high:.3f} |")
    (tn, fp), (fn, tp) = metrics["confusion"]
    lines += [
        "",
        f"Expected calibration error (10 bins): {metrics['ece']:.3f}.",
        f"Confusion: {tp} true positives, {fn} false negatives, {tn} true negatives, {fp} false positives.",
        "",
    ]
    if report.get("per_fold"):
        lines += ["| fold | nodules | AUC | AUC of each seed | threshold |", "|---|---|---|---|---|"]
        for row in report["per_fold"]:
            each = " / ".join("n/a" if a is None else f"{a:.3f}" for a in row.get("seed_aucs", []))
            auc = "n/a" if row["auc"] is None else f"{row['auc']:.3f}"
            lines.append(f"| {row['fold']} | {row['nodules']} | {auc} | {each} | {row['threshold']:.3f} |")
        lines.append("")
    lines += [f"![{Path(f).stem}]({f})" for f in report.get("figures", [])]
    if "figures_missing" in report:
        lines.append(f"({report['figures_missing']})")
    return "\n".join(lines) + "\n"


def _rate(hits: np.ndarray, among: np.ndarray) -> float:
    """Share of ``among`` that are ``hits`` (sensitivity: called among malignant)."""
    if not among.any():
        raise ValueError("no cases to take a rate over")
    return float(np.mean(hits[among]))


def _f1(called: np.ndarray, labels: np.ndarray) -> float:
    tp = np.sum(called & labels)
    denominator = 2 * tp + np.sum(called & ~labels) + np.sum(~called & labels)
    return float(2 * tp / denominator) if denominator else 0.0
