"""``m3net cv``: train one model per held-out fold and pool the out-of-fold predictions.

The folds train one after another, or, given several ``devices`` (``m3net cv --devices
cuda:0,cuda:1`` or ``--devices all``), side by side in one worker process per device
(:mod:`m3netcore.train.workers`); the results agree within float rounding (the workers
use fewer torch threads each).

Each fold's run lives in ``DIR/fold-K`` (a complete ``m3net train`` run folder). Every
nodule is predicted exactly once, by the model that did not train on its fold and was
selected and calibrated without it; ``DIR/oof.csv`` holds these predictions and
``DIR/summary.json`` / ``summary.md`` the pooled metrics with patient-bootstrap intervals
and each fold's AUC. A folder with finished folds continues where it stopped: finished
folds are kept, interrupted ones are resumed (one stopped during its first epoch starts
again).
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
from m3netcore.data.cache import open_cache
from m3netcore.data.manifest import read_rows_csv, rows_to_csv
from m3netcore.errors import M3NetInputError
from m3netcore.outputs import user_entries
from m3netcore.train.checkpointing import CHECKPOINT_FILE
from m3netcore.train.config import RunConfig, read_json_mapping
from m3netcore.train.dataset import cache_folds
from m3netcore.train.evaluate import CALLED_METRICS, classification_metrics
from m3netcore.train.metrics import roc_auc
from m3netcore.train.run import MODEL_FILE, check_same_run, train_run
from m3netcore.train.trainer import METRICS_FILE
from m3netcore.train.workers import DevicePool, tagged_print


def cross_validate(
    data: str | os.PathLike,
    model_name: str,
    out: str | os.PathLike,
    config: RunConfig | None = None,
    *,
    device: str = "auto",
    devices: Sequence[str] = (),
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every fold of the cache into ``out/fold-K``, then pool; returns the summary.

    ``devices``: with two or more, the folds train side by side, one worker process per
    device (their progress lines go to stdout, tagged with the fold); otherwise one after
    another in this process on ``device`` (or the one device given). ``progress``: a
    progress bar on stderr while training one after another, if stderr is a terminal.
    """
    from m3netcore.models.registry import architecture

    out = Path(out)
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
    pending = []
    for fold in folds:
        run = out / f"fold-{fold}"
        if (run / "split.json").is_file():  # a fold begun or finished earlier: the same model, data and cache?
            check_same_run(run, model_name, fold, cache, doing="m3net cv")
        if (run / MODEL_FILE).is_file():
            log(f"fold {fold}: finished earlier ({run / MODEL_FILE})")
            continue
        # a fold stopped during its first epoch has its settings but no checkpoint yet: it resumes from the start
        resume = (run / CHECKPOINT_FILE).is_file() or (run / "config.json").is_file()
        pending.append((fold, run, None if resume else config, resume))
    if len(devices) > 1 and len(pending) > 1:
        calls = []
        for fold, run, settings, resume in pending:
            log(f"fold {fold}: {'resuming' if resume else 'training'} {model_name} into {run}: queued for a worker")
            calls.append((fold, train_run, (data, model_name, fold, run, settings),
                          {"resume": resume, "log": functools.partial(tagged_print, f"fold {fold}")}))  # fmt: skip
        with DevicePool(devices) as pool:
            for fold, _ in pool.run(calls):
                log(f"fold {fold}: finished")
    else:
        for fold, run, settings, resume in pending:
            log(f"fold {fold}: {'resuming' if resume else 'training'} {model_name} into {run}")
            train_run(data, model_name, fold, run, settings, resume=resume, device=device, progress=progress,
                      log=log)  # fmt: skip
    if os.environ.get("RANK", "0") != "0":
        return {}  # under torchrun only rank 0 has the files, and only it pools them
    fold_rows = [read_rows_csv(out / f"fold-{fold}" / "test_predictions.csv") for fold in folds]
    pooled = [row for rows in fold_rows for row in rows]
    write_text_atomic(out / "oof.csv", rows_to_csv(pooled))
    summary = pooled_summary(pooled, fold_rows)
    for entry in summary["per_fold"]:
        entry["training_seconds"] = _training_seconds(out / f"fold-{entry['fold']}")
    times = [entry["training_seconds"] for entry in summary["per_fold"]]
    summary |= {
        "training_seconds": None if None in times else round(sum(times), 1),
        "architecture": model_name, "data": str(cache.path), "data_kind": cache.info.get("kind"),
        "semi_synthetic": cache.semi_synthetic, "protocol": config.protocol, "folds": folds,
        "seconds_this_call": round(time.perf_counter() - started, 1), "config": config.to_dict(),
    }  # fmt: skip
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    m = summary["metrics"]
    log(
        f"pooled out-of-fold ({m['nodules']} nodules): AUC {m['auc']['value']:.3f} "
        f"({m['auc']['ci'][0]:.3f}-{m['auc']['ci'][1]:.3f}), accuracy {m['accuracy']['value']:.3f}; "
        f"wrote {out / 'oof.csv'} and {out / 'summary.md'}"
    )
    return summary


def _training_seconds(run: Path) -> float | None:
    """The epochs' wall time of a fold's run, whichever calls (first, resumed) ran them; None if not recorded."""
    if not (run / METRICS_FILE).is_file():  # the predictions pool without it; only the time is unknown
        return None
    return round(sum(row["seconds"] for row in read_rows_csv(run / METRICS_FILE)), 1)


def pooled_summary(pooled: list[dict], per_fold: list[list[dict]]) -> dict:
    """Metrics of the pooled out-of-fold predictions, and each fold's own AUC."""
    probabilities = np.asarray([row["probability"] for row in pooled], dtype=np.float64)
    called = np.asarray([row["called"] for row in pooled], dtype=bool)
    labels = np.asarray([row["label"] for row in pooled], dtype=np.int64)
    metrics = classification_metrics(probabilities, called, labels, [row["patient_id"] for row in pooled])
    folds = []
    for rows in per_fold:
        y = np.asarray([r["label"] for r in rows])
        p = np.asarray([r["probability"] for r in rows], dtype=np.float64)
        folds.append({"fold": rows[0]["fold"], "nodules": len(rows),
                      "auc": roc_auc(p, y) if len(set(y.tolist())) == 2 else None})  # fmt: skip
    aucs = [row["auc"] for row in folds if row["auc"] is not None]
    # Pooling mixes the folds' calibrations; the mean of the folds' own AUCs does not.
    return {"metrics": metrics, "per_fold": folds, "mean_fold_auc": float(np.mean(aucs)) if aucs else None}


def summary_markdown(summary: dict) -> str:
    m = summary["metrics"]
    lines = [f"# Cross-validation of {summary['architecture']}", ""]
    if summary["semi_synthetic"]:
        lines += [f"**SEMI-SYNTHETIC data ({summary['data_kind']}): these numbers are not about CT of patients.**", ""]
    lines += [
        f"Data `{summary['data']}`, protocol {summary['protocol']}, patient-level folds {summary['folds']}; "
        f"pooled out-of-fold predictions of {m['nodules']} nodules ({m['malignant']} malignant, "
        f"{m['patients']} patients). Each fold's model was selected and calibrated on an inner validation "
        "split of its training folds.",
        "",
        "| metric | value | 95% CI (patient bootstrap) |",
        "|---|---|---|",
    ]
    for name in ("auc", *CALLED_METRICS):
        low, high = m[name]["ci"]
        lines.append(f"| {name.replace('_', ' ')} | {m[name]['value']:.3f} | {low:.3f} - {high:.3f} |")
    mean = "n/a" if summary["mean_fold_auc"] is None else f"{summary['mean_fold_auc']:.3f}"
    lines += ["", f"ECE {m['ece']:.3f}. Mean of the folds' own AUCs: {mean}.", "",
              "| fold | nodules | AUC | training |", "|---|---|---|---|"]  # fmt: skip
    for row in summary["per_fold"]:
        auc = "n/a" if row["auc"] is None else f"{row['auc']:.3f}"
        seconds = row.get("training_seconds")
        lines.append(f"| {row['fold']} | {row['nodules']} | {auc} | {'' if seconds is None else f'{seconds:.0f} s'} |")
    return "\n".join(lines) + "\n"


def _cv_config(out: Path, config: RunConfig | None) -> RunConfig:
    """The settings of the cross-validation in ``out``: given ones for a new folder, the stored ones to continue."""
    stored_path = out / "cv-config.json"
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
