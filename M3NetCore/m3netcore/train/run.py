"""``m3net train``: one model on the training folds of a cache, held-out fold ``K`` untouched (or ``all`` folds).

A run folder holds::

    RUN/
      config.json          the settings (a resumed run uses these)
      split.json           how many nodules of each class train, validate and test
      checkpoint.pt        resumable state, rewritten atomically after every epoch
      metrics.csv          one row per epoch; curves.png plots it (with matplotlib)
      model.safetensors    the selected, calibrated model (checkpoint.py format) with its card
      test_predictions.csv the held-out fold's calibrated probabilities and calls (for cross-validation)
      validation_predictions.csv  the validation nodules' logits (cross-validation recalibrates with them)
      processes.json       under torchrun: each process's weight digest at the end (must be equal)

Training: :class:`m3netcore.train.trainer.Trainer`. Selection: the epoch of best validation
AUC. Calibration: a temperature fitted on the validation nodules, then the threshold that
maximises their balanced accuracy. Under ``torchrun`` the same code trains data-parallel (see
:mod:`m3netcore.train.distributed`); only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import Model, save_model
from m3netcore.data.cache import Cache, cache_digest, open_cache
from m3netcore.data.manifest import rows_to_csv
from m3netcore.errors import M3NetInputError
from m3netcore.metrics import best_threshold, roc_auc
from m3netcore.models.registry import architecture, build_model
from m3netcore.outputs import user_entries
from m3netcore.train import distributed
from m3netcore.train.config import RunConfig, read_json_mapping
from m3netcore.train.dataset import Split, ViewSource, split_cache
from m3netcore.train.loop import fit_temperature
from m3netcore.train.progress import ProgressBar
from m3netcore.train.trainer import Trainer, TrainingDivergedError, predict_logits

MODEL_FILE = "model.safetensors"
VALIDATION_FILE = "validation_predictions.csv"


def train_run(
    data: str | os.PathLike,
    model_name: str,
    fold: int | None,
    out: str | os.PathLike,
    config: RunConfig | None = None,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    device: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train, select, calibrate and write ``out/model.safetensors``; returns a summary.

    Args:
        data: a cache folder (:mod:`m3netcore.data.cache`).
        model_name: a registered architecture.
        fold: the held-out test fold; ``None`` holds none out (every fold trains and validates).
        out: the run folder (created; must not hold another run unless ``resume``).
        config: settings (defaults when ``None``); a resumed run keeps its own.
        resume: continue the interrupted run in ``out`` from its last checkpoint.
        stop_after_epoch: stop after this epoch as if interrupted (checkpoint kept, no
            model file); ``resume`` continues. For time-sliced jobs and the resume test.
        device: "auto", "cpu" or "cuda".
        progress: draw a progress bar on stderr while training, if stderr is a terminal
            (instead of the periodic progress lines; the main process only).

    Raises:
        M3NetInputError: bad cache, model name, fold, protocol or run folder.
    """
    from m3netcore.predict import resolve_device

    out = Path(out)
    config = _run_config(out, config, resume)
    try:
        architecture(model_name)
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
    cache = open_cache(data)
    if resume:
        check_same_run(out, model_name, fold, cache)
    split = split_cache(cache, config.protocol, fold, validation_folds=config.validation_folds, seed=config.seed)
    processes = distributed.start(resolve_device(device))
    try:
        return _train(cache, split, model_name, fold, out, config, processes, resume, stop_after_epoch, progress,
                      log)  # fmt: skip
    finally:
        distributed.stop(processes)


def _train(cache: Cache, split: Split, model_name: str, fold: int | None, out: Path, config: RunConfig,
           processes: distributed.Processes, resume: bool, stop_after_epoch: int | None, progress: bool,
           log: Callable[[str], None]) -> dict:  # fmt: skip
    say = log if processes.main else (lambda _: None)
    source = ViewSource(cache, architecture(model_name).preprocessing(), config, processes.device,
                        keep_untransformed=True)  # validation views, made once
    trainer = Trainer(model_name, split, source, config, processes, out, say,
                      ProgressBar(enabled=None if progress and processes.main else False),
                      identity=checkpoint_identity(model_name, fold, cache, config))  # fmt: skip
    if resume:
        trainer.resume()
        say(f"resumed {out} after epoch {trainer.epochs_done}/{config.epochs}")
    elif processes.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        write_text_atomic(out / "split.json", json.dumps(split.describe() | run_identity(model_name, fold, cache),
                                                         indent=2) + "\n")  # fmt: skip
    counts = split.describe()
    say(
        f"{model_name} {_fold_name(fold)} ({config.protocol}): train {counts['train']['nodules']} "
        f"({counts['train']['malignant']} malignant), validation {counts['validation']['nodules']}, "
        f"test {counts['test']['nodules']} held out; {trainer.steps_per_epoch} steps/epoch x {config.epochs} "
        f"epochs, {processes.world_size} process(es) on {processes.device}"
    )
    if not trainer.train(stop_after_epoch):
        say(f"stopped after epoch {trainer.epochs_done} as asked; continue with --resume")
        return {"stopped_after_epoch": trainer.epochs_done, "out": str(out)}
    if not processes.main:
        return {"out": str(out)}
    return _finish(cache, split, model_name, fold, out, config, trainer, say)


def _finish(cache: Cache, split: Split, model_name: str, fold: int | None, out: Path, config: RunConfig,
            trainer: Trainer, say: Callable[[str], None]) -> dict:  # fmt: skip
    """Select the best epoch, calibrate on validation, predict the held-out fold, write the model."""
    network, source, best, history = trainer.network, trainer.source, trainer.best, trainer.history
    network.load_state_dict(best["network"])
    validation_logits = predict_logits(network, source, split.validation)
    test_logits = predict_logits(network, source, split.test)
    if not (np.all(np.isfinite(validation_logits)) and np.all(np.isfinite(test_logits))):
        raise TrainingDivergedError(
            f"the selected epoch {best['epoch']} gives logits that are not finite numbers: no model or "
            "predictions written; lower learning_rate and start again"
        )
    validation_labels = split.labels_of(split.validation)
    temperature = fit_temperature(validation_logits, validation_labels)
    threshold = best_threshold(_sigmoid(validation_logits / temperature), validation_labels)
    test_labels = split.labels_of(split.test)
    test_probabilities = _sigmoid(test_logits / temperature)
    test_auc = roc_auc(test_probabilities, test_labels) if len(set(test_labels.tolist())) == 2 else None
    test_rows = [
        {"nodule_id": cache.rows[i]["nodule_id"], "patient_id": cache.rows[i]["patient_id"], "fold": fold,
         "label": int(y), "logit": round(float(z), 6), "probability": round(float(p), 6),
         "threshold": round(threshold, 6), "called": int(p >= threshold)}
        for i, y, z, p in zip(split.test, test_labels, test_logits, test_probabilities, strict=True)
    ]  # fmt: skip
    if test_rows:
        write_text_atomic(out / "test_predictions.csv", rows_to_csv(test_rows))
    # the validation logits let cross-validation recalibrate each fold (intercept and temperature) before pooling
    validation_rows = [
        {"nodule_id": cache.rows[i]["nodule_id"], "patient_id": cache.rows[i]["patient_id"], "label": int(y),
         "logit": round(float(z), 6)}
        for i, y, z in zip(split.validation, validation_labels, validation_logits, strict=True)
    ]  # fmt: skip
    write_text_atomic(out / VALIDATION_FILE, rows_to_csv(validation_rows))
    summary = {
        "architecture": model_name, "fold": fold, "protocol": config.protocol, "best_epoch": best["epoch"],
        "validation_auc": best["val_auc"], "temperature": temperature, "threshold": threshold,
        "test_auc": test_auc, "split": split.describe(), "data": str(cache.path),
        "data_kind": cache.info.get("kind"), "semi_synthetic": cache.semi_synthetic,
        "data_description": cache.info.get("description", ""), "config": config.to_dict(),
        "processes": trainer.processes.world_size, "seconds": round(sum(r["seconds"] for r in history), 1),
        "torch": torch.__version__, "cache_digest": cache_digest(cache),
        "trained_folds": sorted({cache.rows[i]["fold"] for i in (*split.train, *split.validation)} - {None}),
    }  # fmt: skip
    plain = build_model(model_name, config.model_config or None)  # plain batch norm for the model file
    plain.load_state_dict(best["network"])
    model = Model(
        network=plain, architecture=model_name, preprocessing=architecture(model_name).preprocessing(),
        temperature=temperature, threshold=threshold, name=f"{model_name}-{_fold_name(fold).replace(' ', '')}",
        version="0",
        card=model_card(summary), metadata={"training": summary, "trained_on": trained_on(cache, split)},
    )  # fmt: skip
    save_model(model, out / MODEL_FILE)
    say(
        f"best epoch {best['epoch']} (validation AUC {best['val_auc']:.3f}); temperature {temperature:.3f}, "
        f"threshold {threshold:.3f}; "
        + ("no held-out fold" if fold is None else f"held-out fold {fold} AUC "
           f"{'n/a' if test_auc is None else f'{test_auc:.3f}'}")
        + f"; wrote {out / MODEL_FILE}"
    )
    return summary


def model_card(summary: dict) -> str:
    """The markdown model card of a trained run: data, protocol, split, selection, calibration, held-out AUC."""
    split, config = summary["split"], summary["config"]
    data = f"SEMI-SYNTHETIC ({summary['data_kind']}): not CT of patients. " if summary["semi_synthetic"] else ""
    test_auc = "n/a (one class)" if summary["test_auc"] is None else f"{summary['test_auc']:.3f}"
    fold = summary["fold"]
    if fold is None:
        held_out = ("- No held-out fold: every fold trained or validated this model. Its held-out estimate is the "
                    "cross-validation (`m3net cv`) of the same settings.")  # fmt: skip
    else:
        held_out = (f"- Held-out fold {fold} ({split['test']['nodules']} nodules, never used for selection or "
                    f"calibration): AUC {test_auc}.")  # fmt: skip
    lines = [
        f"# {summary['architecture']} {_fold_name(fold)}",
        "",
        "NOT FOR CLINICAL USE. Research model trained with `m3net train`.",
        "",
        f"- Data: {data}{summary['data_kind']} cache `{summary['data']}`: {summary['data_description']}",
        f"- Label protocol: {summary['protocol']}. Held-out test fold: "
        f"{'none' if fold is None else fold} (patient-level folds).",
        f"- Training: {split['train']['nodules']} nodules ({split['train']['malignant']} malignant); "
        f"validation, an inner patient-level split of the training folds: {split['validation']['nodules']} "
        f"({split['validation']['malignant']} malignant).",
        f"- Selection: epoch {summary['best_epoch']} of {config['epochs']}, "
        f"validation AUC {summary['validation_auc']:.3f}.",
        f"- Calibration on validation: temperature {summary['temperature']:.3f}; "
        f"threshold {summary['threshold']:.3f} (best balanced accuracy).",
        held_out,
        f"- Settings: lambda (InfoNCE) {config['mi_weight']}, per-scale vote loss {config.get('vote_weight', 0)}, "
        f"batch {config['batch_size']}, AdamW lr "
        f"{config['learning_rate']}, seed {config['seed']}; {summary['processes']} process(es); "
        f"torch {summary['torch']}.",
    ]
    return "\n".join(lines) + "\n"


def _run_config(out: Path, config: RunConfig | None, resume: bool) -> RunConfig:
    if resume:
        saved = out / "config.json"
        if not saved.is_file():
            raise M3NetInputError(f"--resume: {out} holds no run (no config.json)")
        stored = RunConfig.from_dict(read_json_mapping(saved))
        if config is not None and config != stored:
            changed = sorted(k for k, v in config.to_dict().items() if stored.to_dict()[k] != v)
            raise M3NetInputError(f"--resume keeps the run's own settings; these differ: {', '.join(changed)}")
        if (out / MODEL_FILE).exists():
            raise M3NetInputError(f"{out} is finished ({MODEL_FILE} exists): nothing to resume")
        return stored
    if out.exists() and (not out.is_dir() or user_entries(out)):  # m3net's hidden lock does not count
        raise M3NetInputError(f"{out} exists and is not an empty folder; use --resume or another --out")
    return config or RunConfig()


def trained_on(cache: Cache, split: Split) -> dict:
    """What a model file keeps of the nodules that trained or selected it, to recognise them later by content.

    ``patients_sha256``: the first 16 hex digits of the SHA-256 of each training and
    validation patient's id (no ids in a file that may be shared); ``evaluate`` hashes the
    patients it scores the same way and says so when any of them is among these.
    """
    patients = {str(cache.rows[i]["patient_id"]) for i in (*split.train, *split.validation)}
    return {"cache_digest": cache_digest(cache), "patients_sha256": sorted(patient_hash(p) for p in patients)}


def patient_hash(patient_id: object) -> str:
    """The short, one-way name of a patient id kept in model files."""
    return hashlib.sha256(str(patient_id).encode()).hexdigest()[:16]


def checkpoint_identity(model_name: str, fold: int | None, cache: Cache, config: RunConfig) -> dict:
    """What a checkpoint must share with the run that resumes it (see :meth:`Trainer.resume`)."""
    return {"fold": fold, "architecture": model_name, "cache_digest": cache_digest(cache), "seed": config.seed,
            "config": config.to_dict()}  # fmt: skip


def _fold_name(fold: int | None) -> str:
    return "all folds" if fold is None else f"fold {fold}"


def run_identity(model_name: str, fold: int | None, cache: Cache) -> dict:
    """What makes a run folder this run: fold, model, the cache's path and content (``split.json``)."""
    return {"fold": fold, "architecture": model_name, "data": str(Path(cache.path).resolve()),
            "cache_digest": cache_digest(cache)}  # fmt: skip


def check_same_run(out: Path, model_name: str, fold: int | None, cache: Cache, *, doing: str = "--resume") -> None:
    """Continuing ``out`` must be with its own fold, model and data: another fold would train on the test fold.

    The cache is known by its content (:func:`cache_digest`): one rebuilt in place with other
    nodules, folds or labels is another cache, and the same cache moved elsewhere is still
    the run's. Runs written before the digest was kept are known by the cache's path.
    """
    saved = out / "split.json"
    if not saved.is_file():
        raise M3NetInputError(f"{doing}: {out} holds no run (no split.json)")
    stored = read_json_mapping(saved)
    missing = [key for key in ("fold", "architecture", "data") if key not in stored]
    if missing:
        raise M3NetInputError(f"{saved} is damaged: it names no {', '.join(missing)}")
    given = run_identity(model_name, fold, cache)
    differ = [f"{key} {stored.get(key)!r} (given {given[key]!r})" for key in ("fold", "architecture")
              if stored.get(key) != given[key]]  # fmt: skip
    moved = stored.get("data") != given["data"]
    if "cache_digest" in stored and stored["cache_digest"] != given["cache_digest"]:
        differ.append(f"data {stored.get('data')!r} (given {given['data']!r}, other nodules, folds, labels or cubes)"
                      if moved else f"cache {cache.path} has changed since (other nodules, folds, labels or cubes)")
    elif "cache_digest" not in stored and moved:
        differ.append(f"data {stored.get('data')!r} (given {given['data']!r})")
    if differ:
        raise M3NetInputError(f"{doing}: {out} is another run: its {'; '.join(differ)}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
