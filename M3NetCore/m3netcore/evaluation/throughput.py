"""Training throughput: nodules per second through augmentation, forward, backward and step.

For each model, in one process: the cubes (a cache's, or random HU cubes of the shapes a
cache would store for that model) are put on the device once; every step draws a batch,
one random transform per nodule (3D rotation about a random axis, flips, zoom, shift; the
same physical transform for all scales), cuts the model's views out of the cubes on the
device (:func:`m3netcore.train.augment.resample_views`), adds HU noise (the trainer's
noise bank), normalises, and
runs forward, loss (BCE + InfoNCE + per-scale votes where the model has them), backward
and an AdamW step; bf16 autocast on CUDA. Speed does not depend on the voxel values.
The two halves are also timed alone, in the same process: making the views (augmentation
only) and training on one fixed batch of views (network only). The network's rate is the
most training could reach with augmentation for free.
Used by ``m3net benchmark throughput`` and ``benchmarks/gpu_throughput.py``.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from m3netcore.checkpoint import Model
from m3netcore.data.cache import open_cache, pyramid_specs
from m3netcore.errors import M3NetInputError
from m3netcore.losses import cross_scale_infonce, scale_vote_loss
from m3netcore.models.output import ModelOutput
from m3netcore.train.augment import NoiseBank, normalise_hu_tensor, resample_views
from m3netcore.train.config import RunConfig


def random_transforms(batch: int, device: torch.device, *, max_rotation_deg: float = 25.0, max_zoom: float = 0.1,
                      max_shift_mm: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(B, 3, 3)`` matrices (rotation about a random axis @ flips * zoom) and ``(B, 3)`` shifts, on ``device``."""
    axis = F.normalize(torch.randn(batch, 3, device=device), dim=1)
    angle = (torch.rand(batch, device=device) * 2 - 1) * math.radians(max_rotation_deg)
    x, y, z = axis.unbind(1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(batch, 3, 3)
    eye = torch.eye(3, device=device).expand(batch, 3, 3)
    rotation = eye + torch.sin(angle)[:, None, None] * cross + (1 - torch.cos(angle))[:, None, None] * cross @ cross
    flips = torch.where(torch.rand(batch, 3, device=device) < 0.5, -1.0, 1.0)
    zoom = 1 + (torch.rand(batch, device=device) * 2 - 1) * max_zoom
    shifts = (torch.rand(batch, 3, device=device) * 2 - 1) * max_shift_mm
    return rotation * flips[:, None, :] * zoom[:, None, None], shifts


def measure(name: str, device: torch.device, *, batch: int, steps: int, windows: int = 3, warmup: int = 2,
            count: int = 256, data: str | None = None, config: dict | None = None) -> dict:  # fmt: skip
    """Median nodules per second of training steps of architecture ``name`` on ``device``.

    ``config``: field values over the architecture's default config (e.g. narrower encoders).
    """
    model = Model.untrained(name, config)
    network = model.network.to(device).train()
    preprocessing = model.preprocessing
    stored = pyramid_specs(preprocessing)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if data:
        cache = open_cache(data)
        stored_grids = {entry["name"]: tuple(entry["grid"]) for entry in cache.info["pyramid"]}
        if any(stored_grids.get(spec.name) != tuple(spec.grid) for spec in stored):
            raise M3NetInputError(f"the cache {data} does not hold the cubes {name} needs; leave --data out")
        with warnings.catch_warnings():  # the memory map is read-only, and nothing here writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            cubes = [torch.from_numpy(cache.pyramids[spec.name])[:, None].to(device) for spec in stored]
        source = "cache"
    else:
        generator = torch.Generator(device=device).manual_seed(0)
        cubes = [
            torch.randint(-1000, 400, (count, 1, *spec.tensor_shape), generator=generator, device=device,
                          dtype=torch.int16)
            for spec in stored
        ]  # fmt: skip
        source = "random HU"
    total = cubes[0].shape[0]
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cpu":
        network.to(memory_format=torch.channels_last_3d)

    banks = [NoiseBank(spec.tensor_shape, 0, device, stream=k) for k, spec in enumerate(preprocessing.scales)]
    rng = np.random.default_rng(0)

    def make_views() -> tuple[list[torch.Tensor], torch.Tensor]:
        index = torch.randint(total, (batch,), device=device)
        matrices, shifts = random_transforms(batch, device)
        hu = resample_views([c[index].float() for c in cubes], stored, preprocessing.scales, matrices, shifts)
        std = rng.uniform(0.0, 20.0, batch)
        for view, bank in zip(hu, banks, strict=True):  # the trainer's noise (ViewSource)
            bank.add_to(view, np.stack([bank.draw(rng) for _ in range(batch)]), std)
        views = [normalise_hu_tensor(v, preprocessing.hu_window, inplace=True) for v in hu]
        if device.type == "cpu":
            views = [v.contiguous(memory_format=torch.channels_last_3d) for v in views]
        return views, (torch.rand(batch, device=device) < 0.3).float()

    def train_on(views: list[torch.Tensor], labels: torch.Tensor) -> None:
        with autocast:
            output = network(views)
        loss = training_loss(output, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def step() -> None:
        train_on(*make_views())

    fixed = make_views()
    rates = {}
    parts = {"nodules_per_s": step, "augment_per_s": make_views, "network_per_s": lambda: train_on(*fixed)}
    for part, work in parts.items():
        for _ in range(warmup):
            work()
        rates[part] = _median_rate(work, device, batch=batch, steps=steps, windows=windows)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"model": name, "source": source, "nodules": total, "batch": batch, "peak_gib": peak} | rates


def training_loss(output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    """The trainer's loss at its default weights: BCE + lambda InfoNCE + per-scale votes (where the model has them)."""
    defaults = RunConfig()
    loss = F.binary_cross_entropy_with_logits(output.logit.float(), labels)
    if output.embeddings is not None:
        loss = loss + defaults.mi_weight * cross_scale_infonce(output.embeddings.float(), defaults.mi_temperature)
    if output.scale_logits is not None:
        loss = loss + defaults.vote_weight * scale_vote_loss(output.scale_logits, labels)
    return loss


def table(rows: list[dict], device: torch.device) -> str:
    """The rows as a text table, a header line naming the device, and the ratio of the first two."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name()}, bf16 autocast"
    else:
        where = f"CPU, {torch.get_num_threads()} torch threads, float32"
    lines = [f"# {where}, torch {torch.__version__}, augmentation on the device",
             "# nodules/s: augmentation + network; augment only: making the views; network only: forward, "
             "backward and AdamW on one fixed batch (the most training could reach with free augmentation)",
             f"{'model':<12} {'cubes':<10} {'nodules':>8} {'batch':>6} {'nodules/s':>10} {'augment only':>13} "
             f"{'network only':>13} {'peak GiB':>9}"]  # fmt: skip
    for row in rows:
        lines.append(f"{row['model']:<12} {row['source']:<10} {row['nodules']:>8} {row['batch']:>6} "
                     f"{row['nodules_per_s']:>10.1f} {row['augment_per_s']:>13.1f} {row['network_per_s']:>13.1f} "
                     f"{row['peak_gib']:>9.2f}")  # fmt: skip
    if len(rows) == 2:
        ratio = rows[0]["nodules_per_s"] / rows[1]["nodules_per_s"]
        lines.append(f"ratio {rows[0]['model']}/{rows[1]['model']} nodules/s: {ratio:.2f}")
    for row in rows:
        share = row["nodules_per_s"] / row["augment_per_s"]
        lines.append(f"{row['model']}: augmentation takes {share:.0%} of a training step's time; "
                     f"the network alone bounds training at {row['network_per_s']:.1f} nodules/s")  # fmt: skip
    return "\n".join(lines)


def _median_rate(work: Callable[[], object], device: torch.device, *, batch: int, steps: int, windows: int) -> float:
    """Median over ``windows`` timed windows of ``steps`` calls of ``work``, in nodules per second."""
    rates = []
    for _ in range(windows):
        _wait(device)
        start = time.perf_counter()
        for _ in range(steps):
            work()
        _wait(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
