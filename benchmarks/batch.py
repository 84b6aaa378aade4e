"""Scans per minute of ``m3net predict-many`` against a loop of ``m3net predict`` processes.

Generates COUNT chest CTs (every other one a DICOM series, the rest NRRD; 1-3 nodules
each), then times, on the same files:

- a plain loop: one ``m3net predict`` process per CT (start-up and model load every time);
- ``m3net predict-many --workers 1`` and ``--workers 2`` (their own LocalCluster), each
  with ``--read-ahead 0`` (one CT at a time per worker) and the default ``--read-ahead 1``
  (the next CT read while the network runs);
- ``m3net predict-many --scheduler`` on a 2-worker ``distributed.LocalCluster`` of two
  threads per worker started beforehand (a cluster's case: its start-up is not counted),
  once with fresh workers and once more into a new folder with the workers warm (model
  loaded, imports done): the steady state of a long run; and warm again with ``--no-explain``;
- the command's own start-up (a 1-CT manifest on the warm workers), which gives the time
  per CT after start-up, the steady state of a run of thousands of CTs;
- reading every CT once in one process (``m3netcore.read_image``), the floor a batch
  cannot go below; the table ends with predict-many's wall time over this reading time.

Usage::

    .venv/bin/python benchmarks/batch.py [--count 50] [--size 160] [--work DIR]

It prints a table; it is not a test. Needs the ``batch`` extra (dask[distributed]).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

M3NET = str(Path(sys.executable).with_name("m3net"))
SPACING_MM = (0.8, 0.8, 2.0)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="generated CTs (default 50)")
    parser.add_argument("--size", type=int, default=160, help="voxels along x and y; z has 3/4 of it (default 160)")
    parser.add_argument("--work", help="folder for the CTs and outputs (default: a temporary folder, removed)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="m3net-batch-bench-"))
    try:
        run(work, args.count, args.size)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, count: int, size: int) -> None:
    import distributed

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, nodules = generate(data, count, size)
    manifest = data / "manifest.csv"
    manifest.write_text("image,points\n" + "".join(f"{image},{points}\n" for image, points in rows))
    dicom = sum(1 for image, _ in rows if not image.endswith(".nrrd"))
    print(f"generated {count} CTs ({size}x{size}x{size * 3 // 4} voxels, {nodules} nodules, {dicom} DICOM) "
          f"in {time.perf_counter() - start:.0f} s")  # fmt: skip

    timings = {}
    timings["read every CT once (one process)"] = read_all(data, rows)
    timings["loop of `m3net predict` processes"] = timed(lambda: [
        subprocess.run([M3NET, "predict", str(data / image), "--points", str(data / points), "--device", "cpu",
                        "--out", str(work / "loop" / str(n))], check=True, capture_output=True)
        for n, (image, points) in enumerate(rows)])  # fmt: skip
    for workers in (1, 2):
        for ahead in (0, 1):
            timings[f"predict-many --workers {workers} --read-ahead {ahead}"] = timed(lambda w=workers, a=ahead: (
                predict_many(manifest, work / f"many-{w}-{a}", "--workers", str(w), "--read-ahead", str(a))))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:  # fmt: skip
        for run in ("fresh workers", "warm workers"):
            timings[f"predict-many --scheduler (LocalCluster 2x2, {run})"] = timed(lambda r=run: predict_many(
                manifest, work / f"many-cluster-{r.split()[0]}", "--scheduler", cluster.scheduler_address))
        timings["the same, warm workers, --no-explain (no heatmaps)"] = timed(lambda: predict_many(
            manifest, work / "many-cluster-no-explain", "--scheduler", cluster.scheduler_address, "--no-explain"))
        one = data / "one.csv"
        one.write_text("image,points\n" + f"{rows[0][0]},{rows[0][1]}\n")
        start_up = timed(lambda: predict_many(one, work / "many-one", "--scheduler", cluster.scheduler_address))

    reading = timings["read every CT once (one process)"]
    print(f"\n{'how':60s} {'wall s':>8s} {'scans/min':>10s} {'x reading':>10s}")
    for how, seconds in timings.items():
        print(f"{how:60s} {seconds:8.1f} {count / seconds * 60:10.1f} {seconds / reading:10.2f}")
    warm = timings["predict-many --scheduler (LocalCluster 2x2, warm workers)"]
    print(f"\nthe command's own start (1 CT, warm workers): {start_up:.1f} s; after it, predict-many takes "
          f"{(warm - start_up) / (count - 1):.3f} s a CT against {reading / count:.3f} s to read one: "
          f"{(warm - start_up) / (count - 1) / (reading / count):.2f}x reading")  # fmt: skip
    print(f"CPU cores: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}; "
          "predict-many times include starting Python, its workers and the model in each")  # fmt: skip


def generate(folder: Path, count: int, size: int) -> tuple[list[tuple[str, str]], int]:
    rng = np.random.default_rng(2026)
    rows, total = [], 0
    for n in range(count):
        image, centres = chest(rng, size, int(rng.integers(1, 4)))
        name = f"ct-{n:03d}"
        if n % 2:
            write_dicom(image, folder / name, n)
        else:
            name += ".nrrd"
            sitk.WriteImage(image, str(folder / name), useCompression=True)
        points = f"ct-{n:03d}-points.csv"
        (folder / points).write_text("x,y,z\n" + "".join(f"{x:.2f},{y:.2f},{z:.2f}\n" for x, y, z in centres))
        rows.append((name, points))
        total += len(centres)
    return rows, total


def chest(rng: np.random.Generator, size: int, nodules: int) -> tuple[sitk.Image, list[tuple[float, ...]]]:
    """Air, an elliptic body of soft tissue, two noisy lungs and solid nodules in the lungs, int16 HU."""
    shape = (size * 3 // 4, size, size)  # z, y, x
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SPACING_MM[::-1], strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    half, top = size * SPACING_MM[0] / 2, axes[0][-1]
    volume = np.where((x / (0.9 * half)) ** 2 + (y / (0.7 * half)) ** 2 <= 1, 40.0, -1000.0).astype(np.float32)
    volume = np.broadcast_to(volume, shape).copy()
    centres = []
    for side in (-1, 1):
        lung = ((x - side * 0.42 * half) / (0.35 * half)) ** 2 + (y / (0.5 * half)) ** 2 + (z / (0.9 * top)) ** 2
        volume[lung <= 1] = -850.0
    for _ in range(nodules):
        side = rng.choice((-1, 1))
        centre = (side * 0.42 * half + rng.uniform(-8, 8), rng.uniform(-15, 15), rng.uniform(-0.4, 0.4) * top)
        radius = rng.uniform(3.0, 9.0)
        ball = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
        volume[np.broadcast_to(ball, shape)] = rng.uniform(-100, 100)
        centres.append(tuple(float(v) for v in centre))
    volume += rng.normal(0, 15, shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.round(volume).astype(np.int16))
    image.SetSpacing(SPACING_MM)
    image.SetOrigin(tuple(float(a[0]) for a in axes[::-1]))
    return image, centres


def write_dicom(image: sitk.Image, folder: Path, number: int) -> None:
    """One CT Image Storage file per slice, with the tags a series reader needs (SimpleITK/GDCM)."""
    folder.mkdir()
    study, series = f"1.2.826.0.1.3680043.8.498.7{number}.1", f"1.2.826.0.1.3680043.8.498.7{number}.2"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0016": CT_IMAGE_STORAGE, "0008|0018": f"{series}.{k + 1}", "0008|0060": "CT",
                           "0010|0020": f"BENCH-{number}", "0020|000d": study, "0020|000e": series,
                           "0020|0052": f"{study}.9", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{v:.4f}" for v in position),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": f"{SPACING_MM[2]:g}"}.items():  # fmt: skip
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(plane)


def read_all(folder: Path, rows: list[tuple[str, str]]) -> float:
    from m3netcore import read_image

    return timed(lambda: [read_image(folder / image) for image, _ in rows])


def predict_many(manifest: Path, out: Path, *options: str) -> None:
    subprocess.run([M3NET, "predict-many", str(manifest), "--out", str(out), "--device", "cpu", *options],
                   check=True, capture_output=True)  # fmt: skip


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
