"""Peak memory of ``m3net predict`` against the number of points: it must not grow with them.

For each point count, one fresh ``m3net predict`` process runs the bundled demo model on
the demo's generated CT (256 x 256 x 160 voxels) with that many points drawn inside the
CT (a CSV points file), writing results and heatmaps to a scratch folder; its peak resident
memory comes from the kernel (``wait4`` -> ``ru_maxrss``), so nothing in the measured
process is instrumented. With explanation on (the default) every point writes four
heatmaps; ``--no-explain`` measures the probabilities alone.

Prints one table row per count: points, explain, seconds, peak RSS (MiB), MiB per 1,000
points above the smallest count. Takes minutes for 10,000 points on a 2-core CPU.

Run: ``.venv/bin/python benchmarks/points_memory.py [--points 10 1000 10000] [--no-explain]
[--device cpu|cuda] [--python PYTHON]``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m3netcore.data.synthetic import demo_ct


def write_inputs(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """The demo CT as NRRD and ``count`` random points inside its central region as a CSV (LPS)."""
    image, _ = demo_ct(7)
    ct = folder / "ct.nrrd"
    if not ct.exists():
        sitk.WriteImage(image, str(ct), useCompression=True)
    size = np.asarray(image.GetSize())
    rng = np.random.default_rng(seed)
    indices = rng.uniform(0.25, 0.75, size=(count, 3)) * (size - 1)
    points = folder / f"points-{count}.csv"
    with open(points, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "x", "y", "z"])
        for n, index in enumerate(indices, start=1):
            writer.writerow([f"p{n}", *image.TransformContinuousIndexToPhysicalPoint(index.tolist())])
    return ct, points


def measure(python: str, ct: Path, points: Path, out: Path, *, explain: bool, device: str) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one ``m3net predict`` process."""
    command = [python, "-m", "m3netcore.cli", "predict", str(ct), "--points", str(points), "--model", "demo",
               "--device", device, "--out", str(out)]  # fmt: skip
    if not explain:
        command.append("--no-explain")
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    error = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"m3net predict failed ({status}): {error.strip()}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", type=int, default=[10, 1000, 10000], metavar="N")
    parser.add_argument("--no-explain", action="store_true", help="no heatmaps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--python", default=sys.executable, help="interpreter whose m3netcore is measured")
    args = parser.parse_args()
    print(f"# m3net predict peak memory; {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"{datetime.date.today()}, device {args.device}, explain {not args.no_explain}")  # fmt: skip
    print(f"{'points':>8} {'explain':>8} {'seconds':>9} {'peak RSS MiB':>13} {'MiB per 1k points':>18}")
    first = None
    with tempfile.TemporaryDirectory(prefix="m3net-points-memory-") as scratch:
        folder = Path(scratch)
        for count in sorted(args.points):
            ct, points = write_inputs(folder, count)
            seconds, peak = measure(args.python, ct, points, folder / f"out-{count}", explain=not args.no_explain,
                                    device=args.device)  # fmt: skip
            first = first or (count, peak)
            slope = "" if count == first[0] else f"{(peak - first[1]) / (count - first[0]) * 1000:.1f}"
            print(f"{count:>8} {str(not args.no_explain):>8} {seconds:>9.1f} {peak:>13.0f} {slope:>18}", flush=True)


if __name__ == "__main__":
    main()
