"""Training throughput on a GPU: the whole cache in GPU memory, augmentation on the GPU.

A prepared script for a GPU machine (see :mod:`m3netcore.evaluation.throughput` for what one
step does). Without ``--data`` it uses random HU cubes of the shapes a cache stores for
each model (2652 nodules, as LIDC), which measures the same thing when the cache cannot be
copied to the GPU machine. On the CPU, ``m3net benchmark throughput`` is the same
measurement.

Run: ``python3 benchmarks/gpu_throughput.py [--data CACHE] [--models m3net resnet18x3]``.
"""

from __future__ import annotations

import argparse

import torch

from m3netcore.evaluation.throughput import measure, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a training cache (default: random HU cubes of the cache's shapes)")
    parser.add_argument("--count", type=int, default=2652, help="nodules of random cubes (LIDC has 2652)")
    parser.add_argument("--models", nargs="+", default=["m3net", "resnet18x3"])
    parser.add_argument("--batch", type=int, default=256, help="m3net batch")
    parser.add_argument("--resnet-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py: error: no CUDA GPU here; on a CPU run `m3net benchmark throughput`")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    rows = [
        measure(name, device, batch=args.batch if name == "m3net" else args.resnet_batch, steps=args.steps,
                windows=args.windows, warmup=args.warmup, count=args.count, data=args.data)
        for name in args.models
    ]  # fmt: skip
    print(table(rows, device))


if __name__ == "__main__":
    main()
