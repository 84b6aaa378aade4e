"""A plain training loop over in-memory multi-scale crops, and temperature calibration."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3netcore.losses import cross_scale_infonce, scale_vote_loss
from m3netcore.metrics import roc_auc


@dataclass(frozen=True)
class TrainConfig:
    """Args:
    epochs: passes over the training set.
    batch_size: nodules per step (InfoNCE contrasts within a batch).
    learning_rate: AdamW peak learning rate.
    warmup_fraction: share of the steps over which the rate rises linearly to its peak;
        cosine decay to zero follows.
    weight_decay: AdamW weight decay.
    mi_weight: weight lambda of the cross-scale InfoNCE term (0 = the ablation).
    mi_temperature: InfoNCE softmax temperature.
    vote_weight: weight of the per-scale vote loss (models that give ``scale_logits``).
    seed: seeds shuffling, augmentation and dropout (the network's initial weights come
        from whoever built it).
    """

    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    mi_weight: float = 0.1
    mi_temperature: float = 0.1
    vote_weight: float = 0.5
    seed: int = 0


def augment(views: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """One random flip/axis-swap per nodule, the same for all of its views.

    Views are isotropic cubes sampled in LPS, so flips of any axis and swapping the two
    in-plane axes are exact symmetries of the grid (no interpolation).
    """
    batch = views[0].shape[0]
    flips = torch.rand(batch, 3, generator=generator) < 0.5
    swap = torch.rand(batch, generator=generator) < 0.5
    out = []
    for view in views:
        view = view.clone()
        for axis in range(3):
            chosen = flips[:, axis]
            if chosen.any():
                view[chosen] = view[chosen].flip(2 + axis)
        if swap.any():
            view[swap] = view[swap].transpose(3, 4)
        out.append(view)
    return out


def train(
    network: nn.Module,
    views: Sequence[Tensor],
    labels: Tensor,
    config: TrainConfig,
    *,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train ``network`` on views ``(N, 1, D, H, W)`` (one tensor per scale) and 0/1 labels.

    Returns one dict per epoch with the mean losses.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    count = labels.shape[0]
    steps_per_epoch = max(1, count // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (step + 1) / warmup
        if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))),
    )
    positive_weight = (labels == 0).sum().clamp_min(1) / (labels == 1).sum().clamp_min(1)
    network.to(memory_format=torch.channels_last_3d)
    history = []
    for epoch in range(config.epochs):
        network.train()
        order = torch.randperm(count, generator=generator)
        sums = {"loss": 0.0, "bce": 0.0, "mi": 0.0}
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = augment([v[index].float() for v in views], generator)
            batch = [b.contiguous(memory_format=torch.channels_last_3d) for b in batch]
            target = labels[index].float()
            output = network(batch)
            bce = F.binary_cross_entropy_with_logits(output.logit, target, pos_weight=positive_weight)
            mi = torch.zeros(())
            if config.mi_weight > 0 and output.embeddings is not None:
                mi = cross_scale_infonce(output.embeddings, config.mi_temperature)
            loss = bce + config.mi_weight * mi
            if config.vote_weight > 0 and output.scale_logits is not None:
                loss = loss + config.vote_weight * scale_vote_loss(output.scale_logits, target, positive_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            sums["loss"] += float(loss.detach())
            sums["bce"] += float(bce.detach())
            sums["mi"] += float(mi.detach())
        row = {"epoch": epoch + 1} | {k: v / steps_per_epoch for k, v in sums.items()}
        history.append(row)
        log(
            f"epoch {row['epoch']:3d}/{config.epochs}  loss {row['loss']:.4f}  "
            f"bce {row['bce']:.4f}  mi {row['mi']:.4f}"
        )
    network.to(memory_format=torch.contiguous_format)
    return history


@torch.inference_mode()
def predict_logits(network: nn.Module, views: Sequence[Tensor], batch_size: int = 128) -> np.ndarray:
    """Logits of the network in eval mode for all nodules."""
    network.eval()
    logits = []
    for start in range(0, views[0].shape[0], batch_size):
        logits.append(network([v[start : start + batch_size].float() for v in views]).logit.float())
    return torch.cat(logits).numpy()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the validation log-loss of ``sigmoid(logit / T)`` (Guo et al., 2017)."""
    logit_tensor = torch.as_tensor(logits, dtype=torch.float64)
    target = torch.as_tensor(labels, dtype=torch.float64)
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=200)

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logit_tensor / log_temperature.exp(), target)
        loss.backward()
        return loss

    optimiser.step(closure)
    fitted = float(log_temperature.detach().exp())
    if not math.isfinite(fitted):
        # LBFGS can run off to T -> 0 (separable validation logits) and come back NaN: scan instead.
        grid = torch.logspace(math.log10(0.05), math.log10(20.0), 241, dtype=torch.float64)
        losses = [float(F.binary_cross_entropy_with_logits(logit_tensor / t, target)) for t in grid]
        fitted = float(grid[int(np.argmin(losses))])
    return float(np.clip(fitted, 0.05, 20.0))


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict:
    """AUC, accuracy at 0.5 and mean log-loss of calibrated probabilities."""
    probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits) / temperature))
    labels = np.asarray(labels).astype(np.float64)
    eps = 1e-7
    log_loss = -np.mean(labels * np.log(probabilities + eps) + (1 - labels) * np.log(1 - probabilities + eps))
    return {
        "auc": roc_auc(probabilities, labels),
        "accuracy": float(np.mean((probabilities >= 0.5) == labels.astype(bool))),
        "log_loss": float(log_loss),
        "count": int(labels.size),
    }
