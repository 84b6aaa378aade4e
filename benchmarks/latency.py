"""Click latency: ``predict`` with explanation vs the authors'-shape ``resnet18x3`` forward.

Both run in this one process, on one device (``--device cpu``, the default, or ``cuda``),
one after the other:

* ``predict``: one nodule, ``explain=True`` (crops from a 512x512x300 CT already in
  memory, the M3Net forward, Grad-CAM for three scales and the combined map), with the
  untrained-architecture weights of ``m3net`` (the cost does not depend on the values).
* ``resnet18x3`` forward alone: three 3D ResNet-18s at 32x32x56, 64x64x56 and 96x96x56
  voxels, batch 1, ``torch.inference_mode``.

On ``cuda`` it also prints how far the GPU's probabilities and attention are from the
CPU's for the same nodules (they must agree to float tolerance), and times a batch of 64
nodules. GPU timings wait for the GPU (``torch.cuda.synchronize``) before the clock stops.

Prints a table of medians and, on its last line, ``ratio predict/resnet18x3_forward: R``.
Run: ``.venv/bin/python benchmarks/latency.py [--repeats N] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import SimpleITK as sitk
import torch

import m3netcore as m3
from m3netcore.summary import model_summary


def median_seconds(function, repeats: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        _wait()
        start = time.perf_counter()
        function()
        _wait()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def chest_sized_ct(seed: int = 0) -> sitk.Image:
    """A 512x512x300 int16 CT (0.7 x 0.7 x 1.0 mm) with HU-like random content."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 400, size=(300, 512, 512), dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 1.0))
    image.SetOrigin((-179.0, -179.0, -150.0))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    torch.manual_seed(0)
    device = args.device

    image = chest_sized_ct()
    point = image.TransformContinuousIndexToPhysicalPoint((255.5, 255.5, 149.5))
    click = m3.Model.untrained("m3net")
    predict_median, predict_min = median_seconds(
        lambda: m3.predict(click, image, [point], coords="LPS", explain=True, device=device), args.repeats
    )
    extra_rows = []
    if device == "cuda":
        rng = np.random.default_rng(1)
        points = [image.TransformContinuousIndexToPhysicalPoint(tuple(rng.uniform(80, 220, 3))) for _ in range(64)]
        batch_median, batch_min = median_seconds(
            lambda: m3.predict(click, image, points, coords="LPS", explain=True, device=device),
            max(3, args.repeats // 4),
        )
        extra_rows.append(("m3net predict, 64 nodules, explain=True", batch_median, batch_min))
        on_gpu = m3.predict(click, image, points[:8], coords="LPS", explain=True, device="cuda")
        on_cpu = m3.predict(click, image, points[:8], coords="LPS", explain=True, device="cpu")
        probability_gap = max(abs(g.probability - c.probability) for g, c in zip(on_gpu, on_cpu, strict=True))
        attention_gap = max(
            abs(g.scale_attention[k] - c.scale_attention[k]) for g, c in zip(on_gpu, on_cpu, strict=True)
            for k in g.scale_attention
        )
        heatmap_gap = max(
            float(np.abs(sitk.GetArrayViewFromImage(g.heatmaps["combined"])
                         - sitk.GetArrayViewFromImage(c.heatmaps["combined"])).max())
            for g, c in zip(on_gpu, on_cpu, strict=True)
        )  # fmt: skip

    baseline = m3.build_model("resnet18x3").eval().to(device)
    # (B, C, D, H, W) with D = z: the authors' 32x32x56, 64x64x56 and 96x96x56 (x, y, z) voxels.
    authors_inputs = [torch.rand(1, 1, 56, n, n, device=device) for n in (32, 64, 96)]

    def resnet_forward() -> None:
        with torch.inference_mode():
            baseline(authors_inputs)

    resnet_median, resnet_min = median_seconds(resnet_forward, max(5, args.repeats // 4))

    m3net_info = model_summary(m3.Model.untrained("m3net"))
    resnet_info = model_summary(m3.Model.untrained("resnet18x3"))
    where = f"{_cpu_name()}, {torch.get_num_threads()} torch threads"
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()} (host: {where})"
    print(f"# {where}, torch {torch.__version__}, SimpleITK {sitk.Version.VersionString()}")
    print(f"{'what':<48} {'median ms':>10} {'min ms':>10} {'GFLOPs':>8}")
    print(f"{'m3net predict, 1 nodule, explain=True':<48} {predict_median * 1e3:>10.1f} {predict_min * 1e3:>10.1f} "
          f"{m3net_info['gflops']:>8.3f}")
    for name, median, minimum in extra_rows:
        print(f"{name:<48} {median * 1e3:>10.1f} {minimum * 1e3:>10.1f} {m3net_info['gflops'] * 64:>8.2f}")
    print(f"{'resnet18x3 forward only, authors sizes':<48} {resnet_median * 1e3:>10.1f} {resnet_min * 1e3:>10.1f} "
          f"{resnet_info['gflops']:>8.2f}")
    if device == "cuda":
        print(f"cuda vs cpu, 8 nodules: max |probability gap| {probability_gap:.2e}, max |attention gap| "
              f"{attention_gap:.2e}, max |combined heatmap gap| {heatmap_gap:.2e}")
    print(f"ratio predict/resnet18x3_forward: {predict_median / resnet_median:.4f}")


def _wait() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
