"""Running one training under ``torchrun``: process group, synchronised batch norm, gathered InfoNCE.

The goal is that N processes with a global batch of B nodules (B / N each) compute what
one process computes with the whole batch B, up to floating-point rounding:

- DistributedDataParallel averages the gradients of the processes' mean losses, which
  is the gradient of the mean loss over the global batch;
- batch norm takes its statistics over the global batch (``torch.nn.SyncBatchNorm`` on
  GPUs; :class:`GlobalBatchNorm3d` on CPUs, where ``SyncBatchNorm`` does not run);
- InfoNCE contrasts each nodule against every nodule of the global batch: the
  embeddings are gathered with their gradient (:func:`gather_rows`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from m3netcore.losses import cross_scale_infonce


@dataclass(frozen=True)
class Processes:
    """This process's place: rank, how many, its device; ``distributed`` under torchrun."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0


def start(device: torch.device) -> Processes:
    """Join the process group that torchrun describes in the environment (one process: nothing to join).

    Uses NCCL with one GPU per process (``LOCAL_RANK``) on CUDA, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def stop(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def synchronise_batch_norm(network: nn.Module, device: torch.device) -> nn.Module:
    """Make every batch norm layer take its statistics over all processes' nodules."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(network)
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm3d:
                replacement = GlobalBatchNorm3d(child.num_features, child.eps, child.momentum, child.affine,
                                                child.track_running_stats)  # fmt: skip
                replacement.load_state_dict(child.state_dict())
                setattr(parent, name, replacement.to(next(child.parameters()).device))
    return network


class GlobalBatchNorm3d(nn.BatchNorm3d):
    """Batch norm over the global batch of all processes (any backend, CPU included).

    Per channel, the sums of x and x^2 and the count are all-reduced (with their gradient),
    so the mean and biased variance are those of the whole batch. Its state dict is a
    ``BatchNorm3d``'s: model files do not know it was used.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = (0, 2, 3, 4)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        moments = all_reduce_sum(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        channels = x.shape[1]
        total = moments[-1]
        mean = moments[:channels] / total
        variance = (moments[channels : 2 * channels] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(variance.detach() * total / (total - 1).clamp_min(1), self.momentum)
        shape = (1, channels, 1, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over processes; the gradient is summed back (each process's loss depends on the sum)."""
    return _AllReduceSum.apply(tensor)


def gather_rows(tensor: Tensor) -> Tensor:
    """All processes' ``tensor`` concatenated along dim 0 in rank order, with the gradient routed back."""
    return _GatherRows.apply(tensor)


def global_infonce(embeddings: Tensor, processes: Processes, temperature: float) -> Tensor:
    """Cross-scale InfoNCE of this process's nodules against all nodules of the global batch.

    The mean over processes of this value is :func:`m3netcore.losses.cross_scale_infonce`
    of the whole global batch (equal shares per process), and so is its gradient under
    DistributedDataParallel's averaging.
    """
    if not processes.distributed:
        return cross_scale_infonce(embeddings, temperature)
    everyone = gather_rows(embeddings)
    local, scales, _ = embeddings.shape
    if everyone.shape[0] < 2 or scales < 2:
        return embeddings.sum() * 0.0
    targets = torch.arange(local, device=embeddings.device) + processes.rank * local
    losses = []
    for i, j in itertools.combinations(range(scales), 2):
        rows = embeddings[:, i] @ everyone[:, j].T / temperature
        columns = embeddings[:, j] @ everyone[:, i].T / temperature
        losses.append(0.5 * (F.cross_entropy(rows, targets) + F.cross_entropy(columns, targets)))
    return torch.stack(losses).mean()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # A reduce-scatter written as all-reduce + slice: gloo has no reduce-scatter.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]
