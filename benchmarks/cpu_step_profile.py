"""Where an M3Net training step spends its time on a CPU, and how close its convolutions get to the machine.

Prints two tables for a batch of views (default 32, the training batch):

1. Each convolution shape of one scale encoder (M3Net has three encoders of these shapes):
   forward time and GFLOP/s, then forward + backward time and the backward's GFLOP/s, with
   the ratio of backward to forward speed (the forward is the baseline, in the same process).
2. A profile of whole training steps (forward, loss, backward, AdamW): the operators that
   take the most time and their share.
3. Narrower encoders than the default, each timed like ``m3net benchmark throughput``
   (random HU cubes, the trainer's views and noise): the whole step and the network alone,
   with each one's speed against the default's, measured in the same process. This is
   what a cheaper default network would buy on this machine.

Run: ``python benchmarks/cpu_step_profile.py [--batch 32] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from m3netcore.checkpoint import Model
from m3netcore.evaluation.throughput import measure, training_loss
from m3netcore.summary import model_summary

# (stem width, stage widths) of the M3Net encoders to time; the first is the default.
ENCODERS = (
    (24, (32, 48)),
    (16, (24, 32)),
    (16, (16, 32)),
    (16, (32,)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median of 3 windows)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model.untrained("m3net")
    network = model.network.train().to(memory_format=torch.channels_last_3d)
    print(f"# CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, float32, batch {args.batch}, "
          "channels_last_3d")  # fmt: skip
    print(_convolution_table(network, args.batch, args.repeats))
    print()
    print(_step_profile(network, model.preprocessing, args.batch))
    print()
    print(_encoder_table(args.batch))


def _convolution_table(network: nn.Module, batch: int, repeats: int) -> str:
    encoder = next(iter(network.encoders.values()))
    grid = network.config.patch * 8  # the views' 32 voxels a side
    shapes = [("stem", encoder.stem[0], grid, False)]
    inner = grid // network.config.patch
    shapes += [(f"stage {k + 1}", stage[0], inner, True) for k, stage in enumerate(encoder.stages)]
    shapes.append(("last stage", encoder.last_stage[0], inner, True))
    lines = [f"{'convolution':<12} {'shape':<24} {'GFLOP':>7} {'fwd ms':>7} {'fwd GFLOP/s':>12} {'fwd+bwd ms':>11} "
             f"{'bwd GFLOP/s':>12} {'bwd/fwd speed':>14}"]  # fmt: skip
    for name, conv, size, input_grad in shapes:
        conv = conv.to(memory_format=torch.channels_last_3d)
        x = torch.randn(batch, conv.in_channels, size, size, size).contiguous(memory_format=torch.channels_last_3d)
        x.requires_grad_(input_grad)
        out = conv(x)
        gradient = torch.randn_like(out)
        macs = out.numel() * conv.in_channels * conv.weight[0, 0].numel()
        forward_flop = 2 * macs / 1e9
        backward_flop = forward_flop * (2 if input_grad else 1)  # weight gradient, and the input's if needed
        forward_ms, both_ms = _time_convolution(conv, x, gradient, repeats)
        forward_speed = forward_flop / forward_ms * 1e3
        backward_speed = backward_flop / max(both_ms - forward_ms, 1e-6) * 1e3
        shape = f"{conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} @ {size}^3"
        lines.append(f"{name:<12} {shape:<24} {forward_flop:>7.2f} {forward_ms:>7.1f} {forward_speed:>12.1f} "
                     f"{both_ms:>11.1f} {backward_speed:>12.1f} {backward_speed / forward_speed:>14.2f}")  # fmt: skip
    return "\n".join(lines)


def _time_convolution(conv: nn.Module, x: torch.Tensor, gradient: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms of a forward call, and of a forward and backward call."""

    def forward() -> None:
        with torch.no_grad():
            conv(x)

    def forward_backward() -> None:
        conv.zero_grad(set_to_none=True)
        conv(x).backward(gradient)

    return _median_ms(forward, repeats), _median_ms(forward_backward, repeats)


def _step_profile(network: nn.Module, preprocessing, batch: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    views = [torch.rand(batch, 1, *spec.tensor_shape).contiguous(memory_format=torch.channels_last_3d)
             for spec in preprocessing.scales]  # fmt: skip
    labels = (torch.rand(batch) < 0.3).float()
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-3)

    def step() -> None:
        output = network(views)
        loss = training_loss(output, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step_ms = _median_ms(step, 5)
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        for _ in range(5):
            step()
    averages = sorted(recorded.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in averages)
    lines = [f"training step: {step_ms:.1f} ms = {batch / step_ms * 1e3:.1f} nodules/s (network only, median)",
             f"{'operator (self time, 5 profiled steps)':<44} {'share':>6} {'ms/step':>8}"]  # fmt: skip
    for event in averages[:8]:
        lines.append(f"{event.key:<44} {event.self_cpu_time_total / total:>6.1%} "
                     f"{event.self_cpu_time_total / 5 / 1e3:>8.1f}")  # fmt: skip
    return "\n".join(lines)


def _encoder_table(batch: int) -> str:
    """Whole training steps and the network alone for narrower encoders, against the default."""
    lines = [f"{'stem, stages':<16} {'params':>8} {'GFLOP':>6} {'step nodules/s':>15} {'network only':>13} "
             f"{'step x default':>15} {'network x default':>18}"]  # fmt: skip
    baseline = None
    for stem, widths in ENCODERS:
        config = {"stem_width": stem, "widths": widths}
        summary = model_summary(Model.untrained("m3net", config))
        row = measure("m3net", torch.device("cpu"), batch=batch, steps=3, config=config)
        baseline = baseline or row
        lines.append(f"{f'{stem}, {widths}':<16} {summary['parameters']:>8,} {summary['gflops']:>6.3f} "
                     f"{row['nodules_per_s']:>15.1f} {row['network_per_s']:>13.1f} "
                     f"{row['nodules_per_s'] / baseline['nodules_per_s']:>15.2f} "
                     f"{row['network_per_s'] / baseline['network_per_s']:>18.2f}")  # fmt: skip
    lines.append("(GFLOP: one nodule's forward; step: views (resampling, noise, window) + network; "
                 "first row: the default)")  # fmt: skip
    return "\n".join(lines)


def _median_ms(work, repeats: int) -> float:
    work()
    windows = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        windows.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(windows)


if __name__ == "__main__":
    main()
