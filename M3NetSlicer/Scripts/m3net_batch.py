"""M3Net over one CT in batch: the module's Logic without its panel.

In the Slicer application::

    Slicer --no-splash --no-main-window --python-script m3net_batch.py \\
        --volume CT --points FILE --out DIR [--model demo|FILE] [--device auto|cpu|cuda]

or under plain Python with the ``slicer-core`` wheel (same arguments)::

    python m3net_batch.py --volume CT --points FILE --out DIR

CT is an image file (NRRD, NIfTI, MHA, ...) or a DICOM folder; FILE is a Slicer markups
file (.mrk.json), a CSV with x,y,z (and label) columns, or a LUNA16 annotations.csv.
DIR receives results.csv and results.json (the same fields as ``m3net predict``), one
NRRD per heatmap, the scene (scene/scene.mrml with its files) and one PNG per nodule, all
at once when the run succeeds (an earlier run's set is replaced; other files are left
alone; a second run into DIR at the same time is refused). Failures print one line and
exit with status 2, and DIR is then as it was; nothing asks a question.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="m3net_batch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", required=True, help="CT image file or DICOM folder")
    parser.add_argument("--points", required=True, help=".mrk.json, x,y,z CSV or LUNA16 annotations.csv")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default="demo", help="'demo' or a model file from `m3net train`")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--coords", default="LPS", choices=("LPS", "RAS"), help="coordinates of a plain CSV")
    parser.add_argument("--series-uid", help="DICOM series (and LUNA16 rows) to use")
    parser.add_argument("--per-scale", action="store_true", help="also make micro/meso/macro heatmap nodes")
    parser.add_argument("--no-render", action="store_true", help="skip the PNG per nodule")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))  # M3NetSlicerLib beside Scripts/ (source tree and install)
    absent = _missing_packages()
    if absent:
        from M3NetSlicerLib.dependencies import install_hint

        print(f"m3net_batch: error: missing Python packages: {', '.join(absent)}; {install_hint(absent)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return run(args)
    except KeyboardInterrupt:
        print("m3net_batch: interrupted; the output folder is as it was", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user, whatever failed
        if os.environ.get("M3NET_DEBUG"):
            raise
        name = type(err).__name__
        message = str(err).strip().splitlines()[0] if str(err).strip() else name
        expected = {"M3NetInputError", "ModelFileError", "OSError"}  # and their subclasses: the message says it all
        if not expected & {cls.__name__ for cls in type(err).__mro__}:
            message = f"{name}: {message}"
        print(f"m3net_batch: error: {message}", file=sys.stderr)
        return 2


def _missing_packages() -> list[str]:
    """What this script needs and cannot import, checked before anything heavy is imported."""
    import importlib.util

    from M3NetSlicerLib.dependencies import missing_all

    absent = missing_all()
    if importlib.util.find_spec("slicer") is None:  # plain Python without the slicer-core wheel
        absent.append("slicer-core")
    return absent


def run(args: argparse.Namespace) -> int:
    from M3NetSlicerLib.logic import M3NetLogic
    from M3NetSlicerLib.scene_files import save_scene

    import m3netcore
    from m3netcore.outputs import OutputFolder
    from m3netcore.points import points_for_image, unique_labels
    from m3netcore.results import write_results

    started = time.perf_counter()
    # The folder is the run's: a second run into it is refused, and the whole set (results,
    # heatmaps, PNGs, scene) replaces the previous run's at once, or nothing changes.
    with OutputFolder(args.out) as staging:
        image = m3netcore.read_image(args.volume, series_uid=args.series_uid)
        points = points_for_image(args.points, image, args.volume, coords=args.coords)  # LUNA files: this series
        scene, application_logic, volume_rendering_logic, _keep_alive = _application()
        logic = M3NetLogic(scene, volume_rendering_logic)
        model = logic.load_model(args.model)
        volume, markups = _input_nodes(scene, image, args.volume, points, unique_labels(p.label for p in points))
        views = None
        if not args.no_render:
            views = _views(scene, application_logic)
            if views.with_3d:
                from M3NetSlicerLib.display import show_ct_in_3d

                show_ct_in_3d(volume_rendering_logic, volume)
        output = logic.run(
            volume,
            markups,
            model,
            device=args.device,
            per_scale=args.per_scale,
            progress=lambda done, total, label: print(f"[{done}/{total}] {label}", flush=True) if label else None,
        )
        labels = [nodule.label for nodule in output.nodules]
        results = [nodule.result for nodule in output.nodules]
        write_results(results, labels, staging, source={"image": str(args.volume), "points": str(args.points)})
        if views is not None:
            _render_nodules(logic, output, views, staging)
        save_scene(scene, staging / "scene")
    for nodule in output.nodules:
        print(f"{nodule.label}: p={nodule.probability:.3f} ({nodule.prediction})")
    print(f"{len(results)} nodule(s) on {output.device} in {time.perf_counter() - started:.1f} s -> {args.out}")
    return 0


def _input_nodes(scene, image, volume_path, points, labels):
    """The CT as a volume node (lung window) and the points as a point list, in ``scene``."""
    from M3NetSlicerLib.convert import update_volume_node_from_image

    from m3netcore.geometry import lps_to_ras

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    volume.SetName(Path(str(volume_path).rstrip("/")).name.split(".")[0] or "CT")
    update_volume_node_from_image(volume, image)
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(1500.0, -500.0)  # lung window
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    markups.SetName("nodules")
    for point, label in zip(points, labels, strict=True):
        markups.AddControlPoint(*lps_to_ras(point.lps), label)
    return volume, markups


def _application():
    """The running Slicer's scene and logics, or a headless application on the wheel.

    In ``Slicer --no-main-window`` the application logic has no slice or view logics;
    :class:`OffscreenViews` makes the ones the PNGs need.
    """
    import slicer

    if hasattr(slicer, "app"):
        return slicer.mrmlScene, slicer.app.applicationLogic(), slicer.modules.volumerendering.logic(), None
    from M3NetSlicerLib.headless import HeadlessApplication

    app = HeadlessApplication.create()
    slicer.mrmlScene = app.scene
    # ``app`` owns the module logics (MRML keeps only weak references): keep it alive.
    return app.scene, app.application_logic, app.volume_rendering_logic, app


def _views(scene, application_logic):
    from M3NetSlicerLib.headless import OffscreenViews, rendering_available

    views = OffscreenViews(scene, application_logic, size=384)
    available, reason = rendering_available()
    views.with_3d = available
    if not available:
        print(f"m3net_batch: warning: no 3D view in the PNGs: {reason}", file=sys.stderr)
    return views


def _render_nodules(logic, output, views, out: Path) -> None:
    """One PNG per nodule: axial, sagittal, coronal through it, and the 3D view."""
    import numpy as np
    from M3NetSlicerLib.headless import write_png

    for index, nodule in enumerate(output.nodules):
        logic.show_nodule(output, index, render_3d=views.with_3d)
        panels = []
        for name in ("Red", "Yellow", "Green"):
            views.fit_slice(name, 1.5 * max(max(fov) for fov in nodule.result.fields_of_view_mm.values()))
            panels.append(views.capture_slice(name))
        if views.with_3d:
            panels.append(views.capture_3d())
        height = max(p.shape[0] for p in panels)
        row = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels], axis=1)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", nodule.label).strip("._") or "nodule"
        write_png(row, out / f"{nodule.number:02d}_{safe}.png")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
