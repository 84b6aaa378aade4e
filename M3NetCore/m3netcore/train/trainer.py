"""The epochs of one run: optimiser steps, validation, checkpoints and metrics, in one or many processes.

Loss: binary cross-entropy with class balance by loss weight (each malignant nodule weighs
benign count / malignant count of the training nodules) + lambda * cross-scale InfoNCE
+ ``vote_weight`` * the per-scale vote loss (models that vote per scale; 0 for the others).
AdamW with a linear warm-up and cosine decay to zero, stepped per optimiser step. After
each epoch the main process scores the validation nodules (untransformed views), keeps the
weights of the best validation AUC so far (ties: lower validation loss, then the later
epoch; :mod:`m3netcore.train.selection`), and writes the checkpoint and ``metrics.csv``;
``curves.png`` is redrawn after the last epoch, before a requested stop, and otherwise at
most every ``PLOT_EVERY_S`` seconds (drawing it takes about a second: as long as a whole
epoch on a GPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m3netcore.atomic import write_text_atomic
from m3netcore.data.manifest import rows_to_csv
from m3netcore.errors import M3NetInputError
from m3netcore.losses import scale_vote_loss
from m3netcore.metrics import roc_auc
from m3netcore.models.registry import build_model
from m3netcore.train import NO_FIGURES, distributed
from m3netcore.train.checkpointing import CHECKPOINT_FILE, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from m3netcore.train.config import RunConfig
from m3netcore.train.dataset import Split, ViewSource
from m3netcore.train.progress import ProgressBar
from m3netcore.train.selection import is_better_epoch


class TrainingDivergedError(M3NetInputError):
    """The loss or the weights stopped being finite numbers: the run stops before it writes them."""


PLOT_EVERY_S = 60.0
METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = ("epoch", "train_loss", "bce_loss", "mi_loss", "vote_loss", "val_auc", "val_loss", "lr", "seconds",
                  "nodules_per_s")  # fmt: skip


class Trainer:
    """A network, its optimiser and schedule, and the run's history, for one process.

    Args:
        model_name: a registered architecture.
        split: train / validation / test cache indices and labels.
        source: makes the views from the cache.
        config: the run's settings.
        processes: this process's rank, world size and device.
        out: the run folder (written by the main process only).
        say: progress lines (silent in the other processes).
        progress: the progress bar; while it draws, the periodic step lines are left out.
        identity: what makes this run this run (fold, architecture, cache digest, seed,
            settings); kept in every checkpoint, and a checkpoint of another run is refused
            by :meth:`resume`.
    """

    def __init__(self, model_name: str, split: Split, source: ViewSource, config: RunConfig,
                 processes: distributed.Processes, out: Path, say: Callable[[str], None],
                 progress: ProgressBar | None = None, *, identity: dict | None = None) -> None:  # fmt: skip
        if config.batch_size % processes.world_size:
            raise M3NetInputError(
                f"batch_size {config.batch_size} does not split evenly over {processes.world_size} processes"
            )
        self.steps_per_epoch = len(split.train) // config.batch_size
        if self.steps_per_epoch < 1:
            raise M3NetInputError(
                f"{len(split.train)} training nodules are fewer than one batch of {config.batch_size}"
            )
        self.split = split
        self.identity = identity or {}
        self.source = source
        self.config = config
        self.processes = processes
        self.out = out
        self.say = say
        self.progress = progress or ProgressBar(enabled=False)
        device = processes.device
        torch.manual_seed(config.seed)  # the same initial weights in every process
        try:
            network = build_model(model_name, config.model_config or None)
        except (TypeError, ValueError) as err:
            raise M3NetInputError(f"bad model_config for {model_name}: {err}") from err
        if processes.distributed:
            network = distributed.synchronise_batch_norm(network, device)
        network.to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels
        if device.type == "cpu":
            network.to(memory_format=torch.channels_last_3d)  # about 1.7x faster 3D convolutions on CPU
        self.network = network
        self.optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)  # fmt: skip
        total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimiser, warmup_cosine(config.warmup_fraction, total_steps)
        )
        labels = torch.as_tensor(split.labels_of(split.train), dtype=torch.float32)
        self.positive_weight = ((labels == 0).sum() / (labels == 1).sum().clamp_min(1)).to(device)
        self.epochs_done = 0
        self.history: list[dict] = []
        self.best: dict = {"epoch": 0, "val_auc": -math.inf, "network": None}
        self._plotted_at = -math.inf  # time.monotonic() of the last curves.png
        torch.manual_seed(config.seed + 1_000_003 * processes.rank)  # dropout masks differ between processes
        self.model: nn.Module = network
        if processes.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                network, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=config.mi_weight == 0,  # the projection heads get no gradient then
            )  # fmt: skip

    def resume(self) -> None:
        """Continue from ``out/checkpoint.pt``: weights, optimiser, schedule, random states, history.

        A run stopped before its first checkpoint (during epoch 1) has nothing to load: it
        starts from the beginning, with the settings it was begun with.
        """
        if not (self.out / CHECKPOINT_FILE).is_file():
            return
        state = load_checkpoint(self.out / CHECKPOINT_FILE)
        self._check_checkpoint_is_this_runs(state.get("run"))
        if state["world_size"] != self.processes.world_size:
            raise M3NetInputError(
                f"{self.out} was trained by {state['world_size']} process(es); resume it with as many, "
                f"not {self.processes.world_size}"
            )
        self.network.load_state_dict(state["network"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][self.processes.rank])
        self.epochs_done, self.best = state["epoch"], state["best"]
        # a run begun before a column existed (vote_loss) resumes with that cell empty
        self.history = [{key: row.get(key) for key in METRIC_COLUMNS} for row in state["history"]]

    def _check_checkpoint_is_this_runs(self, stored: object) -> None:
        """A checkpoint copied from another run (another fold, seed, model or cache) would
        train on this run's test fold or report another run's selection: refuse it."""
        path = self.out / CHECKPOINT_FILE
        if not self.identity:
            return
        if not isinstance(stored, dict):
            raise M3NetInputError(
                f"--resume: {path} does not record which run wrote it (fold, seed, model, cache), so it cannot be "
                "checked against this run; start the run again in a new folder"
            )
        differ = [f"{key} {stored.get(key)!r} (this run's {value!r})" for key, value in self.identity.items()
                  if key != "config" and stored.get(key) != value]  # fmt: skip
        settings = stored.get("config") or {}
        differ += [f"setting {key} {settings.get(key)!r} (this run's {value!r})"
                   for key, value in sorted(self.identity.get("config", {}).items())
                   if key != "seed" and settings.get(key) != value]  # fmt: skip
        if differ:
            raise M3NetInputError(f"--resume: {path} is another run's checkpoint: its {'; '.join(differ)}")

    def train(self, stop_after_epoch: int | None = None) -> bool:
        """Train the remaining epochs; ``False`` if stopped early (as asked) before the last one."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3net-views") as prefetch:
            while self.epochs_done < self.config.epochs:
                epoch = self.epochs_done
                started = time.perf_counter()
                losses = self._train_epoch(epoch, prefetch)
                self._stop_if_diverged(losses, epoch)
                self.epochs_done += 1
                last = self.epochs_done in (self.config.epochs, stop_after_epoch)
                self._end_epoch(losses, time.perf_counter() - started, plot=last)
                if self.epochs_done == stop_after_epoch and self.epochs_done < self.config.epochs:
                    return False
        self._check_processes_agree()
        return True

    def _stop_if_diverged(self, losses: torch.Tensor, epoch: int) -> None:
        """Raise :class:`TrainingDivergedError` if the epoch's losses or the weights are not finite.

        Checked before the epoch's checkpoint is written, so the last checkpoint and the
        files beside it hold finite numbers only; every process sees the same losses (they
        are averaged over processes) and the same weights, so all of them stop.
        """
        weights_finite = all(bool(torch.isfinite(t).all()) for t in self.network.state_dict().values()
                             if t.is_floating_point())  # fmt: skip
        if bool(torch.isfinite(losses).all()) and weights_finite:
            return
        what = "the weights" if bool(torch.isfinite(losses).all()) else f"the loss ({float(losses[0])})"
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch + 1}: {what} stopped being a finite number "
            f"(learning_rate {self.config.learning_rate:g}); nothing of this epoch was written and no model "
            "was made: lower learning_rate and start again"
        )

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """This process's share of each global batch of ``epoch`` (the order depends on seed and epoch only)."""
        size, rank = self.config.batch_size, self.processes.rank
        local = size // self.processes.world_size
        order = np.random.default_rng([self.config.seed, epoch, 0x5EED]).permutation(self.split.train)
        steps = range(self.steps_per_epoch)
        return [order[s * size : (s + 1) * size][rank * local : (rank + 1) * local] for s in steps]

    def _train_epoch(self, epoch: int, prefetch: ThreadPoolExecutor) -> torch.Tensor:
        """One pass; returns the mean (total, BCE, InfoNCE, vote) losses over the steps and processes.

        The next batch's views are made in a thread while the network trains on this one
        (views depend only on the nodules and the epoch, so this changes no number).
        """
        config, device = self.config, self.processes.device
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.model.train()
        batches = self._batches(epoch)
        started = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        upcoming = prefetch.submit(self.source.views, batches[0], epoch=epoch)
        for step, indices in enumerate(batches):
            views = upcoming.result()
            if step + 1 < len(batches):
                upcoming = prefetch.submit(self.source.views, batches[step + 1], epoch=epoch)
            if device.type == "cpu":
                views = [v.contiguous(memory_format=torch.channels_last_3d) for v in views]
            target = torch.as_tensor(self.split.labels_of(indices), dtype=torch.float32, device=device)
            with autocast:
                output = self.model(views)
            bce = F.binary_cross_entropy_with_logits(output.logit.float(), target, pos_weight=self.positive_weight)
            mi = torch.zeros((), device=device)
            if config.mi_weight > 0 and output.embeddings is not None:
                mi = distributed.global_infonce(output.embeddings.float(), self.processes, config.mi_temperature)
            vote = torch.zeros((), device=device)
            if config.vote_weight > 0 and output.scale_logits is not None:
                vote = scale_vote_loss(output.scale_logits, target, self.positive_weight)
            loss = bce + config.mi_weight * mi + config.vote_weight * vote
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            self.scheduler.step()
            # summed where they are: reading a GPU number each step would stall the GPU's queue
            sums += torch.stack([loss.detach(), bce.detach(), mi.detach(), vote.detach()]).double()
            bar = self.progress
            if bar.due(step + 1, len(batches)) or (not bar.enabled and (step + 1) % config.log_every == 0):
                rate = (step + 1) * config.batch_size / (time.perf_counter() - started)
                status = (f"loss {float(loss.detach()):.4f} lr {self.scheduler.get_last_lr()[0]:.2e} "
                          f"{rate:.0f} nodules/s")  # fmt: skip
                if bar.enabled:
                    bar.update(f"epoch {epoch + 1}/{config.epochs}", step + 1, len(batches), status)
                else:
                    self.say(f"epoch {epoch + 1}/{config.epochs} step {step + 1}/{len(batches)} {status}")
        self.progress.clear()  # the epoch's summary line takes its place
        if self.processes.distributed:
            torch.distributed.all_reduce(sums)  # on the process's device, as NCCL needs
            sums = sums / self.processes.world_size
        return sums.cpu() / len(batches)

    def _end_epoch(self, losses: torch.Tensor, seconds: float, *, plot: bool) -> None:
        """Validate, keep the best weights, write checkpoint, metrics and (if ``plot`` or due) curves (main process)."""
        rngs = [rng_state()]
        if self.processes.distributed:
            rngs = [None] * self.processes.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if self.processes.main:
            epoch, config = self.epochs_done, self.config
            logits = predict_logits(self.network, self.source, self.split.validation)
            labels = self.split.labels_of(self.split.validation)
            validation_loss = F.binary_cross_entropy_with_logits(
                torch.from_numpy(logits), torch.from_numpy(labels).double()
            )
            row = {
                "epoch": epoch, "train_loss": float(losses[0]), "bce_loss": float(losses[1]),
                "mi_loss": float(losses[2]), "vote_loss": float(losses[3]), "val_auc": roc_auc(logits, labels),
                "val_loss": float(validation_loss),
                "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 2),
                "nodules_per_s": round(self.steps_per_epoch * config.batch_size / seconds, 1),
            }  # fmt: skip
            self.history.append(row)
            if is_better_epoch(row, self.best):  # AUC, then lower validation loss, then the later epoch
                self.best = {"epoch": epoch, "val_auc": row["val_auc"], "val_loss": row["val_loss"],
                             "network": cpu_state(self.network)}  # fmt: skip
            save_checkpoint(self.out / CHECKPOINT_FILE, {
                "epoch": epoch, "network": cpu_state(self.network), "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rngs, "best": self.best, "history": self.history,
                "world_size": self.processes.world_size, "run": self.identity,
            })  # fmt: skip
            write_text_atomic(self.out / METRICS_FILE, rows_to_csv(self.history))
            if plot or time.monotonic() - self._plotted_at >= PLOT_EVERY_S:
                if not _plot(self.history, self.out) and self._plotted_at == -math.inf:
                    self.say(f"{NO_FIGURES}; {METRICS_FILE} has the numbers")
                self._plotted_at = time.monotonic()
            self.say(
                f"epoch {epoch}/{config.epochs}: loss {row['train_loss']:.4f} (bce {row['bce_loss']:.4f}, "
                f"mi {row['mi_loss']:.4f}, votes {row['vote_loss']:.4f}), validation AUC {row['val_auc']:.3f} "
                f"loss {row['val_loss']:.4f}, {seconds:.1f} s, {row['nodules_per_s']:.0f} nodules/s"
            )
        if self.processes.distributed:
            torch.distributed.barrier()

    def _check_processes_agree(self) -> None:
        """Under torchrun: do all processes hold the same weights and buffers? Written to ``processes.json``.

        DistributedDataParallel keeps them equal by construction; a mismatch means a broken
        setup (e.g. a layer whose state is not synchronised), so it is an error, not a warning.
        """
        if not self.processes.distributed:
            return
        digests = [None] * self.processes.world_size
        torch.distributed.all_gather_object(digests, weights_digest(self.network))
        identical = len(set(digests)) == 1
        if self.processes.main:
            document = {"world_size": self.processes.world_size, "identical": identical, "weights_sha256": digests}
            write_text_atomic(self.out / "processes.json", json.dumps(document, indent=2) + "\n")
        if not identical:
            raise RuntimeError(f"the {self.processes.world_size} processes ended with different weights: {digests}")


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


def warmup_cosine(warmup_fraction: float, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


def weights_digest(network: nn.Module) -> str:
    """SHA-256 over the network's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(cpu_state(network).items()):
        digest.update(key.encode())
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cpu_state(network: nn.Module) -> dict:
    """A detached, contiguous CPU copy of the state dict (what checkpoints and model files store)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in network.state_dict().items()}


def _plot(history: list[dict], out: Path) -> bool:
    """Draw ``curves.png``; False when matplotlib (the [report] extra) is not installed."""
    try:
        from m3netcore.train.plots import plot_curves
    except ImportError:
        return False
    plot_curves(history, out / "curves.png")
    return True
