"""Click latency: ``predict`` with explanation vs the authors'-shape ``resnet18x3`` forward.

Both run in this one process, on the CPU, one after the other:

* ``predict``: one nodule, ``explain=True`` (crops from a 512x512x300 CT already in
  memory, the M3Net forward, Grad-CAM for three scales and the combined map), with the
  untrained-architecture weights of ``m3net`` (the cost does not depend on the values).
* ``resnet18x3`` forward alone: three 3D ResNet-18s at 32x32x56, 64x64x56 and 96x96x56
  voxels, batch 1, ``torch.inference_mode``.

Prints a table of medians and, on its last line, ``ratio predict/resnet18x3_forward: R``.
Run: ``.venv/bin/python benchmarks/latency.py [--repeats N]``.
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
        start = time.perf_counter()
        function()
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
    args = parser.parse_args()
    torch.manual_seed(0)

    image = chest_sized_ct()
    point = image.TransformContinuousIndexToPhysicalPoint((255.5, 255.5, 149.5))
    click = m3.Model.untrained("m3net")
    predict_median, predict_min = median_seconds(
        lambda: m3.predict(click, image, [point], coords="LPS", explain=True, device="cpu"), args.repeats
    )

    baseline = m3.build_model("resnet18x3").eval()
    # (B, C, D, H, W) with D = z: the authors' 32x32x56, 64x64x56 and 96x96x56 (x, y, z) voxels.
    authors_inputs = [torch.rand(1, 1, 56, n, n) for n in (32, 64, 96)]

    def resnet_forward() -> None:
        with torch.inference_mode():
            baseline(authors_inputs)

    resnet_median, resnet_min = median_seconds(resnet_forward, max(5, args.repeats // 4))

    m3net_info = model_summary(click)
    resnet_info = model_summary(m3.Model.untrained("resnet18x3"))
    print(f"# {_cpu_name()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, SimpleITK {sitk.Version.VersionString()}")
    print(f"{'what':<48} {'median ms':>10} {'min ms':>10} {'GFLOPs':>8}")
    print(f"{'m3net predict, 1 nodule, explain=True':<48} {predict_median * 1e3:>10.1f} {predict_min * 1e3:>10.1f} "
          f"{m3net_info['gflops']:>8.3f}")
    print(f"{'resnet18x3 forward only, authors sizes':<48} {resnet_median * 1e3:>10.1f} {resnet_min * 1e3:>10.1f} "
          f"{resnet_info['gflops']:>8.2f}")
    print(f"ratio predict/resnet18x3_forward: {predict_median / resnet_median:.4f}")


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
