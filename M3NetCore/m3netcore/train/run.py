"""``m3net train``: one model on the training folds of a cache, held-out fold ``K`` untouched.

A run folder holds::

    RUN/
      config.json          the settings (a resumed run uses these)
      split.json           how many nodules of each class train, validate and test
      checkpoint.pt        resumable state, rewritten atomically after every epoch
      metrics.csv          one row per epoch; curves.png plots it (with matplotlib)
      model.safetensors    the selected, calibrated model (checkpoint.py format) with its card
      test_predictions.csv the held-out fold's calibrated probabilities and calls (for cross-validation)
      processes.json       under torchrun: each process's weight digest at the end (must be equal)

Training: AdamW, linear warm-up then cosine decay (per step); loss = class-weighted binary
cross-entropy (class balance by loss weight: malignant cases weigh benign/malignant) +
lambda * cross-scale InfoNCE. Selection: the epoch of best validation AUC. Calibration:
a temperature fitted on the validation nodules, then the threshold that maximises their
balanced accuracy. Under ``torchrun`` the same code trains data-parallel (see
:mod:`m3netcore.train.distributed`); only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import Model, save_model
from m3netcore.data.cache import Cache, open_cache
from m3netcore.data.manifest import rows_to_csv
from m3netcore.errors import M3NetInputError
from m3netcore.models.registry import architecture, build_model
from m3netcore.train import distributed
from m3netcore.train.checkpointing import CHECKPOINT_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from m3netcore.train.config import RunConfig
from m3netcore.train.dataset import Split, ViewSource, split_cache
from m3netcore.train.loop import fit_temperature
from m3netcore.train.metrics import roc_auc

MODEL_FILE = "model.safetensors"
METRIC_COLUMNS = ("epoch", "train_loss", "bce_loss", "mi_loss", "val_auc", "val_loss", "lr", "seconds", "nodules_per_s")


def train_run(
    data: str | os.PathLike,
    model_name: str,
    fold: int,
    out: str | os.PathLike,
    config: RunConfig | None = None,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict:
    """Train, select, calibrate and write ``out/model.safetensors``; returns a summary.

    Args:
        data: a cache folder (:mod:`m3netcore.data.cache`).
        model_name: a registered architecture.
        fold: the held-out test fold.
        out: the run folder (created; must not hold another run unless ``resume``).
        config: settings (defaults when ``None``); a resumed run keeps its own.
        resume: continue the interrupted run in ``out`` from its last checkpoint.
        stop_after_epoch: stop after this epoch as if interrupted (checkpoint kept, no
            model file); ``resume`` continues. For time-sliced jobs and the resume test.
        device: "auto", "cpu" or "cuda".

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
    split = split_cache(cache, config.protocol, fold, validation_folds=config.validation_folds, seed=config.seed)
    processes = distributed.start(resolve_device(device))
    try:
        return _train(cache, split, model_name, fold, out, config, processes, resume, stop_after_epoch, log)
    finally:
        distributed.stop(processes)


def _train(cache: Cache, split: Split, model_name: str, fold: int, out: Path, config: RunConfig,
           processes: distributed.Processes, resume: bool, stop_after_epoch: int | None,
           log: Callable[[str], None]) -> dict:  # fmt: skip
    say = log if processes.main else (lambda _: None)
    device = processes.device
    if config.batch_size % processes.world_size:
        raise M3NetInputError(
            f"batch_size {config.batch_size} does not split evenly over {processes.world_size} processes"
        )
    local_batch = config.batch_size // processes.world_size
    steps_per_epoch = len(split.train) // config.batch_size
    if steps_per_epoch < 1:
        raise M3NetInputError(f"{len(split.train)} training nodules are fewer than one batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs

    torch.manual_seed(config.seed)  # the same initial weights in every process
    try:
        network = build_model(model_name, config.model_config or None)
    except (TypeError, ValueError) as err:
        raise M3NetInputError(f"bad model_config for {model_name}: {err}") from err
    preprocessing = architecture(model_name).preprocessing()
    source = ViewSource(cache, preprocessing, config, device)
    if processes.distributed:
        network = distributed.synchronise_batch_norm(network, device)
    network.to(device)
    if device.type == "cpu":
        network.to(memory_format=torch.channels_last_3d)  # about 1.7x faster 3D convolutions on CPU
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(config.warmup_fraction, total_steps))
    train_labels = torch.as_tensor(split.labels_of(split.train), dtype=torch.float32)
    positive_weight = ((train_labels == 0).sum() / (train_labels == 1).sum().clamp_min(1)).to(device)

    start_epoch, history, best = 0, [], {"epoch": 0, "val_auc": -math.inf, "network": None}
    torch.manual_seed(config.seed + 1_000_003 * processes.rank)  # dropout masks differ between processes
    if resume:
        state = load_checkpoint(out / CHECKPOINT_FILE)
        if state["world_size"] != processes.world_size:
            raise M3NetInputError(
                f"{out} was trained by {state['world_size']} process(es); resume it with as many, "
                f"not {processes.world_size}"
            )
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][processes.rank])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        say(f"resumed {out} after epoch {start_epoch}/{config.epochs}")
    elif processes.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        write_text_atomic(out / "split.json", json.dumps(split.describe() | {"fold": fold}, indent=2) + "\n")

    model = network
    if processes.distributed:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.mi_weight == 0,  # the projection heads get no gradient then
        )  # fmt: skip
    counts = split.describe()
    say(
        f"{model_name} fold {fold} ({config.protocol}): train {counts['train']['nodules']} "
        f"({counts['train']['malignant']} malignant), validation {counts['validation']['nodules']}, "
        f"test {counts['test']['nodules']} held out; {steps_per_epoch} steps/epoch x {config.epochs} epochs, "
        f"{processes.world_size} process(es) on {device}"
    )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3net-views") as prefetch:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            started = time.perf_counter()
            order = np.random.default_rng([config.seed, epoch, 0x5EED]).permutation(split.train)
            batches = [
                order[step * config.batch_size : (step + 1) * config.batch_size][
                    processes.rank * local_batch : (processes.rank + 1) * local_batch
                ]
                for step in range(steps_per_epoch)
            ]
            sums = _train_epoch(model, source, batches, epoch, split, optimiser, scheduler, positive_weight,
                                config, processes, prefetch, say)  # fmt: skip
            seconds = time.perf_counter() - started
            row = {"epoch": epoch + 1, "train_loss": float(sums[0]), "bce_loss": float(sums[1]),
                   "mi_loss": float(sums[2])}  # fmt: skip
            rngs = [rng_state()]
            if processes.distributed:
                rngs = [None] * processes.world_size
                torch.distributed.all_gather_object(rngs, rng_state())
            if processes.main:
                logits = predict_logits(network, source, split.validation)
                labels = split.labels_of(split.validation)
                row |= {
                    "val_auc": roc_auc(logits, labels),
                    "val_loss": float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits),
                                                                         torch.from_numpy(labels).double())),
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": round(seconds, 2),
                    "nodules_per_s": round(steps_per_epoch * config.batch_size / seconds, 1),
                }  # fmt: skip
                history.append(row)
                if row["val_auc"] > best["val_auc"]:
                    best = {"epoch": epoch + 1, "val_auc": row["val_auc"], "network": _cpu_state(network)}
                save_checkpoint(out / CHECKPOINT_FILE, {
                    "epoch": epoch + 1, "network": _cpu_state(network), "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rngs, "best": best, "history": history,
                    "world_size": processes.world_size,
                })  # fmt: skip
                write_text_atomic(out / "metrics.csv", rows_to_csv(history))
                _plot(history, out)
                say(
                    f"epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f} (bce {row['bce_loss']:.4f}, "
                    f"mi {row['mi_loss']:.4f}), validation AUC {row['val_auc']:.3f} loss {row['val_loss']:.4f}, "
                    f"{seconds:.1f} s, {row['nodules_per_s']:.0f} nodules/s"
                )
            if processes.distributed:
                torch.distributed.barrier()
            if stop_after_epoch is not None and epoch + 1 == stop_after_epoch and epoch + 1 < config.epochs:
                say(f"stopped after epoch {epoch + 1} as asked; continue with --resume")
                return {"stopped_after_epoch": epoch + 1, "out": str(out)}
    _check_processes_agree(network, processes, out)
    if not processes.main:
        return {"out": str(out)}
    return _finish(cache, split, model_name, fold, out, config, network, source, best, history, processes, say)


def _train_epoch(model, source, batches, epoch, split, optimiser, scheduler, positive_weight, config, processes,
                 prefetch, say) -> torch.Tensor:  # fmt: skip
    """One pass over ``batches`` (this process's share of each global batch); returns the mean losses.

    The next batch's views are made in a thread while the network trains on this one (views
    depend only on the nodules and the epoch, so this changes no number).
    """
    device = processes.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = time.perf_counter()
    sums = torch.zeros(3, dtype=torch.float64)
    upcoming = prefetch.submit(source.views, batches[0], epoch=epoch)
    for step, indices in enumerate(batches):
        views = upcoming.result()
        if step + 1 < len(batches):
            upcoming = prefetch.submit(source.views, batches[step + 1], epoch=epoch)
        if device.type == "cpu":
            views = [v.contiguous(memory_format=torch.channels_last_3d) for v in views]
        target = torch.as_tensor(split.labels_of(indices), dtype=torch.float32, device=device)
        with autocast:
            output = model(views)
        bce = F.binary_cross_entropy_with_logits(output.logit.float(), target, pos_weight=positive_weight)
        mi = torch.zeros((), device=device)
        if config.mi_weight > 0 and output.embeddings is not None:
            mi = distributed.global_infonce(output.embeddings.float(), processes, config.mi_temperature)
        loss = bce + config.mi_weight * mi
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        values = [float(v.detach()) for v in (loss, bce, mi)]
        sums += torch.tensor(values, dtype=torch.float64)
        if (step + 1) % config.log_every == 0:
            rate = (step + 1) * config.batch_size / (time.perf_counter() - started)
            say(
                f"epoch {epoch + 1}/{config.epochs} step {step + 1}/{len(batches)} loss {values[0]:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.0f} nodules/s"
            )
    if processes.distributed:
        torch.distributed.all_reduce(sums)
        sums /= processes.world_size
    return sums / len(batches)


def _finish(cache, split, model_name, fold, out, config, network, source, best, history, processes, say) -> dict:
    """Select the best epoch, calibrate on validation, predict the held-out fold, write the model."""
    network.load_state_dict(best["network"])
    validation_logits = predict_logits(network, source, split.validation)
    validation_labels = split.labels_of(split.validation)
    temperature = fit_temperature(validation_logits, validation_labels)
    threshold = best_threshold(_sigmoid(validation_logits / temperature), validation_labels)
    test_logits = predict_logits(network, source, split.test)
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
    summary = {
        "architecture": model_name, "fold": fold, "protocol": config.protocol, "best_epoch": best["epoch"],
        "validation_auc": best["val_auc"], "temperature": temperature, "threshold": threshold,
        "test_auc": test_auc, "split": split.describe(), "data": str(cache.path),
        "data_kind": cache.info.get("kind"), "semi_synthetic": cache.semi_synthetic,
        "data_description": cache.info.get("description", ""), "config": config.to_dict(),
        "processes": processes.world_size, "seconds": round(sum(r["seconds"] for r in history), 1),
        "torch": torch.__version__,
    }  # fmt: skip
    plain = build_model(model_name, config.model_config or None)  # plain batch norm for the model file
    plain.load_state_dict(best["network"])
    model = Model(
        network=plain, architecture=model_name, preprocessing=architecture(model_name).preprocessing(),
        temperature=temperature, threshold=threshold, name=f"{model_name}-fold{fold}", version="0",
        card=model_card(summary), metadata={"training": summary},
    )  # fmt: skip
    save_model(model, out / MODEL_FILE)
    say(
        f"best epoch {best['epoch']} (validation AUC {best['val_auc']:.3f}); temperature {temperature:.3f}, "
        f"threshold {threshold:.3f}; held-out fold {fold} AUC "
        f"{'n/a' if test_auc is None else f'{test_auc:.3f}'}; wrote {out / MODEL_FILE}"
    )
    return summary


@torch.inference_mode()
def predict_logits(network: nn.Module, source: ViewSource, indices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of untransformed views (exactly what inference sees), network in eval mode."""
    was_training = network.training
    network.eval()
    logits = []
    for start in range(0, len(indices), batch_size):
        views = source.views(indices[start : start + batch_size])
        logits.append(network(views).logit.float().cpu())
    network.train(was_training)
    return torch.cat(logits).double().numpy() if logits else np.zeros(0)


def best_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The probability threshold of highest balanced accuracy (Youden's J) on these nodules."""
    labels = np.asarray(labels).astype(bool)
    candidates = np.unique(probabilities)
    best, best_score = 0.5, -1.0
    for threshold in candidates:
        called = probabilities >= threshold
        score = called[labels].mean() + (~called[~labels]).mean()
        if score > best_score:
            best, best_score = float(threshold), score
    return best


def model_card(summary: dict) -> str:
    """The markdown model card of a trained run: data, protocol, split, selection, calibration, held-out AUC."""
    split, config = summary["split"], summary["config"]
    data = f"SEMI-SYNTHETIC ({summary['data_kind']}): not CT of patients. " if summary["semi_synthetic"] else ""
    test_auc = "n/a (one class)" if summary["test_auc"] is None else f"{summary['test_auc']:.3f}"
    lines = [
        f"# {summary['architecture']} fold {summary['fold']}",
        "",
        "NOT FOR CLINICAL USE. Research model trained with `m3net train`.",
        "",
        f"- Data: {data}{summary['data_kind']} cache `{summary['data']}`: {summary['data_description']}",
        f"- Label protocol: {summary['protocol']}. Held-out test fold: {summary['fold']} (patient-level folds).",
        f"- Training: {split['train']['nodules']} nodules ({split['train']['malignant']} malignant); "
        f"validation, an inner patient-level split of the training folds: {split['validation']['nodules']} "
        f"({split['validation']['malignant']} malignant).",
        f"- Selection: epoch {summary['best_epoch']} of {config['epochs']}, "
        f"validation AUC {summary['validation_auc']:.3f}.",
        f"- Calibration on validation: temperature {summary['temperature']:.3f}; "
        f"threshold {summary['threshold']:.3f} (best balanced accuracy).",
        f"- Held-out fold {summary['fold']} ({split['test']['nodules']} nodules, never used for selection or "
        f"calibration): AUC {test_auc}.",
        f"- Settings: lambda (InfoNCE) {config['mi_weight']}, batch {config['batch_size']}, AdamW lr "
        f"{config['learning_rate']}, seed {config['seed']}; {summary['processes']} process(es); "
        f"torch {summary['torch']}.",
    ]
    return "\n".join(lines) + "\n"


def _run_config(out: Path, config: RunConfig | None, resume: bool) -> RunConfig:
    if resume:
        saved = out / "config.json"
        if not saved.is_file():
            raise M3NetInputError(f"--resume: {out} holds no run (no config.json)")
        stored = RunConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
        if config is not None and config != stored:
            changed = sorted(k for k, v in config.to_dict().items() if stored.to_dict()[k] != v)
            raise M3NetInputError(f"--resume keeps the run's own settings; these differ: {', '.join(changed)}")
        if (out / MODEL_FILE).exists():
            raise M3NetInputError(f"{out} is finished ({MODEL_FILE} exists): nothing to resume")
        return stored
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise M3NetInputError(f"{out} exists and is not an empty folder; use --resume or another --out")
    return config or RunConfig()


def _check_processes_agree(network: nn.Module, processes: distributed.Processes, out: Path) -> bool:
    """Under torchrun: do all processes hold the same weights and buffers? Written to ``RUN/processes.json``.

    DistributedDataParallel keeps them equal by construction; a mismatch means a broken
    setup (e.g. a layer whose state is not synchronised), so it is an error, not a warning.
    """
    if not processes.distributed:
        return True
    digest = weights_digest(network)
    digests = [None] * processes.world_size
    torch.distributed.all_gather_object(digests, digest)
    identical = len(set(digests)) == 1
    if processes.main:
        document = {"world_size": processes.world_size, "identical": identical, "weights_sha256": digests}
        write_text_atomic(out / "processes.json", json.dumps(document, indent=2) + "\n")
    if not identical:
        raise RuntimeError(f"the {processes.world_size} processes ended with different weights: {digests}")
    return identical


def weights_digest(network: nn.Module) -> str:
    """SHA-256 over the network's state dict (names, dtypes, shapes and bytes, in name order)."""
    import hashlib

    digest = hashlib.sha256()
    for key, tensor in sorted(_cpu_state(network).items()):
        digest.update(key.encode())
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _warmup_cosine(warmup_fraction: float, total_steps: int) -> Callable[[int], float]:
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


def _cpu_state(network: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in network.state_dict().items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _plot(history: list[dict], out: Path) -> None:
    try:
        from m3netcore.train.plots import plot_curves
    except ImportError:  # matplotlib is the [report] extra; the CSV has the numbers anyway
        return
    plot_curves(history, out / "curves.png")
