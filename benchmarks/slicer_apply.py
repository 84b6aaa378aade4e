"""Apply in Slicer vs the core alone: what the panel adds to ``m3netcore.predict``.

On Slicer's own MRML (the ``slicer-core`` wheel, a headless application with three slice
views), with the generated demo CT (256x256x160) and the bundled demo model on the CPU,
in this one process:

* ``predict``: ``m3netcore.predict`` for one nodule with explanation, on the image
  already in memory (the baseline).
* ``Apply, 1 nodule``: the panel's path for one point, after a first Apply has loaded
  torch and the model: volume node -> image, predict, table, heatmap node, 3D surface,
  slice views and field-of-view boxes (``PanelController.apply``).
* ``Apply, 2 nodules``: the same for the demo's two points.
* ``longest wait for Cancel``: the longest time between two cancel checks in a 2-nodule
  Apply (Cancel is honoured between nodules).

Prints a table of medians and, on its last line, ``ratio apply_1_nodule/predict: R``.
Run: ``.venv/bin/python benchmarks/slicer_apply.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import slicer
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "M3NetSlicer"))

from M3NetSlicerLib.convert import control_points, image_from_volume_node  # noqa: E402
from M3NetSlicerLib.headless import HeadlessApplication, OffscreenViews  # noqa: E402
from M3NetSlicerLib.panel import PanelController, PanelParameters  # noqa: E402

import m3netcore  # noqa: E402


def median(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    app = HeadlessApplication.create()
    slicer.mrmlScene = app.scene
    OffscreenViews(app.scene, app.application_logic, size=256)
    params = PanelParameters(device="cpu")
    panel = PanelController(app.scene, params, ensure_dependencies=lambda: None)
    volume, points = panel.load_demo()
    started = time.perf_counter()
    panel.apply()  # the first Apply: loads the model, makes every node
    first = time.perf_counter() - started

    model = panel.logic().load_model("demo")
    image = image_from_volume_node(volume)
    first_point = control_points(points)[0][1]
    apply_two = median(panel.apply, args.repeats)
    checks = []
    panel.apply(should_cancel=lambda: checks.append(time.perf_counter()) or False)
    longest_wait = max(b - a for a, b in zip(checks, checks[1:], strict=False))

    one = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    position = [0.0, 0.0, 0.0]
    points.GetNthControlPointPosition(0, position)
    one.AddControlPoint(*position, points.GetNthControlPointLabel(0))
    params.nodules = one
    panel.apply()
    # Interleaved, so that whatever else the machine does weighs on both alike.
    predict_times, apply_times = [], []
    for _ in range(args.repeats):
        predict_times.append(median(lambda: m3netcore.predict(model, image, [first_point], device="cpu"), 1))
        apply_times.append(median(panel.apply, 1))
    predict, apply_one = statistics.median(predict_times), statistics.median(apply_times)

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {args.repeats} repeats, demo CT 256x256x160, demo model, CPU")  # fmt: skip
    print(f"{'step':<28}{'median s':>10}")
    for name, seconds in (
        ("first Apply (2 nodules)", first),
        ("predict, 1 nodule", predict),
        ("Apply, 1 nodule", apply_one),
        ("Apply, 2 nodules", apply_two),
        ("longest wait for Cancel", longest_wait),
    ):
        print(f"{name:<28}{seconds:>10.3f}")
    print(f"ratio apply_1_nodule/predict: {apply_one / predict:.2f}")


if __name__ == "__main__":
    main()
