"""``m3net cv``: train one model per held-out fold and pool the out-of-fold predictions.

The folds train one after another, or, given several ``devices`` (``m3net cv --devices
cuda:0,cuda:1`` or ``--devices all``), side by side in one worker process per device
(:mod:`m3netcore.evaluation.workers`); the results agree within float rounding (the workers
use fewer torch threads each).

Each fold's run lives in ``DIR/fold-K`` (a complete ``m3net train`` run folder), and its
further seeds in ``DIR/fold-K-seed-S``. Every nodule is predicted by the models that did
not train on its fold and were selected and calibrated without it. Before pooling, each
fold model gets an intercept and a temperature fitted on its own validation split, and
a fold's seeds are averaged in that logit space (:mod:`m3netcore.evaluation.pooling`), so
that the pooled AUC measures the networks and not the folds' different calibrations.
``DIR/oof.csv`` holds these predictions and ``DIR/summary.json`` / ``summary.md`` the
pooled metrics with patient-bootstrap intervals, each fold's and seed's AUC, their
spread, and the paired AUC difference to the diameter-only regression. A folder with
finished folds continues where it stopped: finished folds are kept, interrupted ones are
resumed (one stopped during its first epoch starts again).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from m3netcore.atomic import write_text_atomic
from m3netcore.data.baselines import REFERENCE_MODELS
from m3netcore.data.cache import Cache, open_cache
from m3netcore.data.manifest import read_rows_csv, rows_to_csv
from m3netcore.errors import M3NetInputError
from m3netcore.evaluation.comparison import paired_by_nodule, spread
from m3netcore.evaluation.evaluate import CALLED_METRICS, classification_metrics
from m3netcore.evaluation.pooling import ENSEMBLE, POOLING, average_logits, fit_recalibration, logit, sigmoid
from m3netcore.evaluation.workers import DevicePool, tagged_print
from m3netcore.metrics import best_threshold, roc_auc
from m3netcore.outputs import user_entries
from m3netcore.progress import Countdown
from m3netcore.train.checkpointing import CHECKPOINT_FILE
from m3netcore.train.config import RunConfig, read_json_mapping
from m3netcore.train.dataset import cache_folds
from m3netcore.train.run import MODEL_FILE, VALIDATION_FILE, check_same_run, train_run
from m3netcore.train.trainer import METRICS_FILE

CV_CONFIG_FILE = "cv-config.json"
DIAMETER_ROW = next(name for name, features in REFERENCE_MODELS.items() if features == ("diameter_mm",))


def cross_validate(
    data: str | os.PathLike,
    model_name: str,
    out: str | os.PathLike,
    config: RunConfig | None = None,
    *,
    seeds: int = 1,
    device: str = "auto",
    devices: Sequence[str] = (),
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every fold of the cache into ``out/fold-K`` (``seeds`` times), then pool; returns the summary.

    ``seeds``: models per fold, seeded ``config.seed``, ``config.seed + 1``, ...; the first
    trains into ``fold-K``, the others into ``fold-K-seed-S``. Their recalibrated logits are
    averaged (:mod:`m3netcore.evaluation.pooling`); each seed's own pooled AUC is reported too.
    A folder cross-validated with fewer seeds gains the missing ones.

    ``devices``: with two or more, the runs train side by side, one worker process per
    device (their progress lines go to stdout, tagged with the fold); otherwise one after
    another in this process on ``device`` (or the one device given). ``progress``: a
    progress bar on stderr while training one after another, if stderr is a terminal.
    """
    from m3netcore.models.registry import architecture

    out = Path(out)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise M3NetInputError(f"--seeds must be a whole number of at least 1, got {seeds!r}")
    if len(devices) > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise M3NetInputError("--devices spreads the folds over worker processes; do not also start it under torchrun")
    try:
        architecture(model_name)
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
    cache = open_cache(data)
    folds = cache_folds(cache)
    config = _cv_config(out, config)
    started = time.perf_counter()
    device = devices[0] if devices else device
    runs = [(fold, config.seed + k, seed_run_folder(out, fold, k, config.seed + k))
            for k in range(seeds) for fold in folds]  # fmt: skip
    pending = []
    for fold, seed, run in runs:
        name = f"fold {fold}" + (f" seed {seed}" if seed != config.seed else "")
        if (run / "split.json").is_file():  # a fold begun or finished earlier: the same model, data and cache?
            check_same_run(run, model_name, fold, cache, doing="m3net cv")
        if (run / MODEL_FILE).is_file():
            log(f"{name}: finished earlier ({run / MODEL_FILE})")
            continue
        # a fold stopped during its first epoch has its settings but no checkpoint yet: it resumes from the start
        resume = (run / CHECKPOINT_FILE).is_file() or (run / "config.json").is_file()
        pending.append((name, fold, run, None if resume else config.replace(seed=seed), resume))
    if len(devices) > 1 and len(pending) > 1:
        calls = []
        for name, fold, run, settings, resume in pending:
            log(f"{name}: {'resuming' if resume else 'training'} {model_name} into {run}: queued for a worker")
            calls.append((name, train_run, (data, model_name, fold, run, settings),
                          {"resume": resume, "log": functools.partial(tagged_print, name)}))  # fmt: skip
        countdown = Countdown(len(pending))
        with DevicePool(devices) as pool:
            for done, (name, _) in enumerate(pool.run(calls), start=1):
                log(f"{name}: finished; folds {countdown.text(done)}")
    else:
        countdown = Countdown(len(pending))
        for done, (name, fold, run, settings, resume) in enumerate(pending):
            doing = "resuming" if resume else "training"
            log(f"{name}: {doing} {model_name} into {run} (folds {countdown.text(done)})")
            train_run(data, model_name, fold, run, settings, resume=resume, device=device, progress=progress,
                      log=log)  # fmt: skip
    if os.environ.get("RANK", "0") != "0":
        return {}  # under torchrun only rank 0 has the files, and only it pools them
    summary, pooled_rows = pool_cross_validation(out, cache, [config.seed + k for k in range(seeds)], folds)
    write_text_atomic(out / "oof.csv", rows_to_csv(pooled_rows))
    summary |= {
        "architecture": model_name, "seconds_this_call": round(time.perf_counter() - started, 1),
        "config": config.to_dict(),
    }  # fmt: skip
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    m = summary["metrics"]
    folds_auc = summary["fold_auc"]
    log(
        f"pooled out-of-fold ({m['nodules']} nodules, {len(summary['seeds'])} seed(s) per fold, each fold "
        f"recalibrated on its validation split): AUC {m['auc']['value']:.3f} "
        f"({m['auc']['ci'][0]:.3f}-{m['auc']['ci'][1]:.3f}); per-fold AUC {folds_auc['mean']:.3f} "
        f"+/- {folds_auc['sd']:.3f}; accuracy {m['accuracy']['value']:.3f}; "
        f"wrote {out / 'oof.csv'} and {out / 'summary.md'}"
    )
    return summary


def seed_run_folder(out: Path, fold: int, seed_index: int, seed: int) -> Path:
    """Where fold ``fold`` trains with its ``seed_index``-th seed: ``fold-K``, then ``fold-K-seed-S``."""
    return out / (f"fold-{fold}" if seed_index == 0 else f"fold-{fold}-seed-{seed}")


def is_cross_validation(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ``m3net cv`` folder (it keeps the cross-validation's settings)."""
    return (Path(path) / CV_CONFIG_FILE).is_file()


def finished_seeds(out: str | os.PathLike) -> tuple[list[int], list[int]]:
    """The folds of the cv folder ``out`` and the seeds every one of them has finished, in training order.

    Raises:
        M3NetInputError: ``out`` holds no finished fold run of its first seed.
    """
    out = Path(out)
    config = RunConfig.from_dict(read_json_mapping(out / CV_CONFIG_FILE))
    folds = sorted(int(p.name.split("-")[1]) for p in out.glob("fold-*") if p.name.count("-") == 1
                   and p.name.split("-")[1].isdigit() and (p / MODEL_FILE).is_file())  # fmt: skip
    if not folds:
        raise M3NetInputError(f"{out} holds no finished fold (no fold-K/{MODEL_FILE})")
    seeds = [config.seed]
    while all((seed_run_folder(out, fold, len(seeds), config.seed + len(seeds)) / MODEL_FILE).is_file()
              for fold in folds):  # fmt: skip
        seeds.append(config.seed + len(seeds))
    return folds, seeds


def pool_cross_validation(out: str | os.PathLike, cache: Cache, seeds: Sequence[int],
                          folds: Sequence[int]) -> tuple[dict, list[dict]]:  # fmt: skip
    """Recalibrate every fold model on its validation split, average each fold's seeds, pool.

    Returns the summary (without the caller's own keys) and the pooled out-of-fold rows
    (``oof.csv``). The summary: the pooled metrics of the seed ensemble (one seed: that
    seed's model) with patient-bootstrap intervals, the spread of the per-fold AUCs, each
    seed's own pooled AUC, the pooled AUC without recalibration, and the paired AUC
    difference to the diameter-only regression where the cache has diameters.
    """
    out = Path(out)
    seeds = list(seeds)
    per_fold, pooled_rows, seed_scores, as_run_calibrated = [], [], {s: {} for s in seeds}, {}
    for fold in folds:
        runs = [_fold_run(seed_run_folder(out, fold, k, seed), cache, fold) for k, seed in enumerate(seeds)]
        first = runs[0]
        for run in runs[1:]:
            if run["nodule_ids"] != first["nodule_ids"]:
                raise M3NetInputError(f"the seeds of fold {fold} in {out} did not predict the same nodules")
        for seed, run in zip(seeds, runs, strict=True):
            seed_scores[seed] |= dict(zip(first["nodule_ids"], run["logits"], strict=True))
        as_run_calibrated |= dict(zip(first["nodule_ids"], first["run_probabilities"], strict=True))
        ensemble = average_logits([run["logits"] for run in runs])
        threshold = float(sigmoid(np.mean([logit(run["threshold"]) for run in runs])))
        probabilities = sigmoid(ensemble)
        for k, nodule in enumerate(first["nodule_ids"]):
            pooled_rows.append(
                {"nodule_id": nodule, "patient_id": first["patients"][k], "fold": fold,
                 "label": int(first["labels"][k]),
                 "logit": round(float(ensemble[k]), 6), "probability": round(float(probabilities[k]), 6),
                 "threshold": round(threshold, 6), "called": int(probabilities[k] >= threshold)}
            )  # fmt: skip
        labels = first["labels"]
        two_classes = len(set(labels.tolist())) == 2
        seconds = [_training_seconds(run["folder"]) for run in runs]
        per_fold.append({
            "fold": fold, "nodules": len(labels), "auc": roc_auc(ensemble, labels) if two_classes else None,
            "seed_aucs": [roc_auc(run["logits"], labels) if two_classes else None for run in runs],
            "recalibration": [run["recalibration"].to_dict() for run in runs], "threshold": threshold,
            "training_seconds": None if None in seconds else round(sum(seconds), 1),
        })  # fmt: skip
    summary = pooled_summary(pooled_rows, [[r for r in pooled_rows if r["fold"] == f] for f in folds])
    summary["per_fold"] = per_fold  # with the seeds' AUCs and the recalibrations
    summary["fold_auc"] = spread([entry["auc"] for entry in per_fold])
    summary["mean_fold_auc"] = summary["fold_auc"]["mean"]
    labels = {row["nodule_id"]: row["label"] for row in pooled_rows}
    single = [roc_auc(np.array([scores[n] for n in labels]), np.array(list(labels.values()))) for scores in
              seed_scores.values()]  # fmt: skip
    times = [entry["training_seconds"] for entry in per_fold]
    summary |= {
        "seeds": seeds, "pooling": POOLING + ("; " + ENSEMBLE if len(seeds) > 1 else ""),
        "single_seed": {"pooled_auc": spread(single), "pooled_aucs": single,
                        "fold_auc": spread([a for entry in per_fold for a in entry["seed_aucs"]])},
        "pooled_auc_as_each_run_calibrated_itself": roc_auc(
            np.array([as_run_calibrated[n] for n in labels]), np.array(list(labels.values()))),
        "training_seconds": None if None in times else round(sum(times), 1),
        "data": str(cache.path), "data_kind": cache.info.get("kind"), "semi_synthetic": cache.semi_synthetic,
        "protocol": _run_config_of(seed_run_folder(out, folds[0], 0, seeds[0])).protocol, "folds": list(folds),
    }  # fmt: skip
    summary["versus_diameter"] = _versus_diameter(pooled_rows, cache, summary["protocol"])
    return summary, pooled_rows


def _fold_run(run: Path, cache: Cache, fold: int) -> dict:
    """One finished fold run's held-out logits, recalibrated on its own validation split, and its threshold."""
    test = read_rows_csv(run / "test_predictions.csv")
    validation_labels, validation_logits = _validation_logits(run, cache, fold)
    try:
        recalibration = fit_recalibration(validation_logits, validation_labels)
    except ValueError as err:
        raise M3NetInputError(f"{run}: cannot recalibrate: {err}") from err
    threshold = best_threshold(sigmoid(recalibration(validation_logits)), validation_labels)
    return {
        "folder": run, "nodule_ids": [str(r["nodule_id"]) for r in test],
        "patients": [str(r["patient_id"]) for r in test],
        "labels": np.asarray([r["label"] for r in test], dtype=np.int64),
        "logits": recalibration(np.asarray([r["logit"] for r in test], dtype=np.float64)),
        "run_probabilities": [float(r["probability"]) for r in test],
        "recalibration": recalibration, "threshold": threshold,
    }  # fmt: skip


def _validation_logits(run: Path, cache: Cache, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation labels and logits: from its file, or (older runs) scored again with its model."""
    path = run / VALIDATION_FILE
    if not path.is_file():
        from m3netcore.checkpoint import load_model
        from m3netcore.evaluation.evaluate import predict_probabilities
        from m3netcore.predict import resolve_device
        from m3netcore.train.dataset import split_cache

        config = _run_config_of(run)
        split = split_cache(cache, config.protocol, fold, validation_folds=config.validation_folds, seed=config.seed)
        model = load_model(run / MODEL_FILE)
        probabilities = predict_probabilities(model, cache, split.validation, device=resolve_device("cpu"))
        rows = [{"nodule_id": cache.rows[i]["nodule_id"], "patient_id": cache.rows[i]["patient_id"], "label": int(y),
                 "logit": round(float(z), 6)}
                for i, y, z in zip(split.validation, split.labels_of(split.validation),
                                   logit(probabilities) * model.temperature, strict=True)]  # fmt: skip
        write_text_atomic(path, rows_to_csv(rows))
    rows = read_rows_csv(path)
    return (np.asarray([r["label"] for r in rows], dtype=np.int64),
            np.asarray([r["logit"] for r in rows], dtype=np.float64))  # fmt: skip


def _run_config_of(run: Path) -> RunConfig:
    return RunConfig.from_dict(read_json_mapping(run / "config.json"))


def _versus_diameter(pooled_rows: list[dict], cache: Cache, protocol: str) -> dict | None:
    """The paired AUC difference to the diameter-only regression on the same nodules, if the cache has diameters."""
    from m3netcore.data.baselines import reference_scores

    if not cache.rows or "diameter_mm" not in cache.rows[0]:
        return None
    try:
        diameter = reference_scores(cache.rows, protocol, DIAMETER_ROW)
    except M3NetInputError:
        return None
    scores = {row["nodule_id"]: row["logit"] for row in pooled_rows}
    labels = {row["nodule_id"]: row["label"] for row in pooled_rows}
    patients = {row["nodule_id"]: row["patient_id"] for row in pooled_rows}
    try:
        return paired_by_nodule(scores, {str(k): v for k, v in diameter.items()}, labels, patients)
    except ValueError:
        return None


def _training_seconds(run: Path) -> float | None:
    """The epochs' wall time of a fold's run, whichever calls (first, resumed) ran them; None if not recorded."""
    if not (run / METRICS_FILE).is_file():  # the predictions pool without it; only the time is unknown
        return None
    return round(sum(row["seconds"] for row in read_rows_csv(run / METRICS_FILE)), 1)


def pooled_summary(pooled: list[dict], per_fold: list[list[dict]]) -> dict:
    """Metrics of the pooled out-of-fold predictions, and each fold's own AUC and their spread."""
    probabilities = np.asarray([row["probability"] for row in pooled], dtype=np.float64)
    called = np.asarray([row["called"] for row in pooled], dtype=bool)
    labels = np.asarray([row["label"] for row in pooled], dtype=np.int64)
    scores = None
    if all(row.get("logit") is not None for row in pooled):  # logits rank without the ties of rounded probabilities
        scores = np.asarray([row["logit"] for row in pooled], dtype=np.float64)
    metrics = classification_metrics(probabilities, called, labels, [row["patient_id"] for row in pooled],
                                      scores=scores)  # fmt: skip
    folds = []
    for rows in per_fold:
        y = np.asarray([r["label"] for r in rows])
        p = np.asarray([r["logit" if r.get("logit") is not None else "probability"] for r in rows], dtype=np.float64)
        folds.append({"fold": rows[0]["fold"], "nodules": len(rows),
                      "auc": roc_auc(p, y) if len(set(y.tolist())) == 2 else None})  # fmt: skip
    fold_auc = spread([row["auc"] for row in folds])
    return {"metrics": metrics, "per_fold": folds, "mean_fold_auc": fold_auc["mean"], "fold_auc": fold_auc}


def summary_markdown(summary: dict) -> str:
    m = summary["metrics"]
    seeds = summary.get("seeds", [summary.get("config", {}).get("seed", 0)])
    lines = [f"# Cross-validation of {summary['architecture']}", ""]
    if summary["semi_synthetic"]:
        lines += [f"**SEMI-SYNTHETIC data ({summary['data_kind']}): these numbers are not about CT of patients.**", ""]
    lines += [
        f"Data `{summary['data']}`, protocol {summary['protocol']}, patient-level folds {summary['folds']}; "
        f"pooled out-of-fold predictions of {m['nodules']} nodules ({m['malignant']} malignant, "
        f"{m['patients']} patients). Each fold's model was selected and calibrated on an inner validation "
        f"split of its training folds. {len(seeds)} seed(s) per fold ({', '.join(map(str, seeds))}). "
        f"Pooling: {summary.get('pooling', 'as each run calibrated itself')}.",
        "",
        "| metric | value | 95% CI (patient bootstrap) |",
        "|---|---|---|",
    ]
    for name in ("auc", *CALLED_METRICS):
        low, high = m[name]["ci"]
        lines.append(f"| {name.replace('_', ' ')} | {m[name]['value']:.3f} | {low:.3f} - {high:.3f} |")
    lines += ["", f"ECE {m['ece']:.3f}. Per-fold AUC: {format_spread(summary['fold_auc'])}."]
    if "single_seed" in summary:
        single = summary["single_seed"]
        lines.append(
            f"Single seeds: pooled AUC {format_spread(single['pooled_auc'], extent=False)} over "
            f"{single['pooled_auc']['n']} seed(s); per-fold AUC {format_spread(single['fold_auc'])} over every "
            f"fold and seed. Pooled as each run calibrated itself (seed {seeds[0]}, no recalibration): "
            f"{summary['pooled_auc_as_each_run_calibrated_itself']:.3f}."
        )
    if summary.get("versus_diameter"):
        lines.append(f"Paired AUC difference to the diameter-only regression on the same nodules: "
                     f"{format_difference(summary['versus_diameter'])} (95% CI, patient bootstrap).")  # fmt: skip
    lines += ["", "| fold | nodules | AUC | AUC of each seed | training |", "|---|---|---|---|---|"]
    for row in summary["per_fold"]:
        auc = "n/a" if row["auc"] is None else f"{row['auc']:.3f}"
        each = " / ".join("n/a" if a is None else f"{a:.3f}" for a in row.get("seed_aucs", []))
        seconds = row.get("training_seconds")
        lines.append(f"| {row['fold']} | {row['nodules']} | {auc} | {each} | "
                     f"{'' if seconds is None else f'{seconds:.0f} s'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def format_spread(values: dict, *, extent: bool = True) -> str:
    """``0.889 +/- 0.025 (0.859-0.924)``: mean +/- SD (min-max) of :func:`spread`."""
    if values.get("mean") is None:
        return "n/a"
    text = f"{values['mean']:.3f} +/- {values['sd']:.3f}"
    return text + (f" ({values['min']:.3f}-{values['max']:.3f})" if extent else "")


def format_difference(paired: dict) -> str:
    """``+0.012 (-0.010 to +0.034)`` of :func:`m3netcore.evaluation.comparison.paired_auc_difference`."""
    low, high = paired["ci"]
    return f"{paired['difference']:+.3f} ({low:+.3f} to {high:+.3f})"


def _cv_config(out: Path, config: RunConfig | None) -> RunConfig:
    """The settings of the cross-validation in ``out``: given ones for a new folder, the stored ones to continue."""
    stored_path = out / CV_CONFIG_FILE
    if stored_path.is_file():
        stored = RunConfig.from_dict(read_json_mapping(stored_path))
        if config is not None and config != stored:
            changed = sorted(k for k, v in config.to_dict().items() if stored.to_dict()[k] != v)
            raise M3NetInputError(f"{out} holds a cross-validation with other settings ({', '.join(changed)})")
        return stored
    if out.exists() and (not out.is_dir() or user_entries(out)):  # m3net's hidden lock does not count
        raise M3NetInputError(f"{out} exists and is not an empty folder or a cross-validation to continue")
    config = config or RunConfig()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
        write_text_atomic(stored_path, json.dumps(config.to_dict(), indent=2) + "\n")
    return config
