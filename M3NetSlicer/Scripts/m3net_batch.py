"""M3Net over one CT in batch: the module's Logic without its panel.

In the Slicer application::

    Slicer --no-splash --no-main-window --python-script m3net_batch.py \\
        --volume CT --points FILE --out DIR [--model demo|FILE] [--device auto|cpu|cuda]

or under plain Python with the ``slicer-core`` wheel (same arguments)::

    python m3net_batch.py --volume CT --points FILE --out DIR

CT is an image file (NRRD, NIfTI, MHA, ...) or a DICOM folder; FILE is a Slicer markups
file (.mrk.json), a CSV with x,y,z (and label) columns, or a LUNA16 annotations.csv.
DIR receives results.csv and results.json (the same fields as ``m3net predict``, with the
run's provenance), one NRRD per heatmap, the scene (scene/scene.mrml with its files) and
one PNG per nodule, all at once when the run succeeds (an earlier run's set is replaced;
other files are left alone; a second run into DIR at the same time is refused). Failures
print one line and exit with status 2, and DIR is then as it was; nothing asks a question.

As ``m3net predict``: ``--report`` adds an overview PNG per nodule and report.html;
``--dicom`` (DICOM input only) adds DIR/dicom/SR.dcm and a Parametric Map per nodule;
``--dicomweb URL --study UID [--series-uid UID]`` reads the CT from a PACS instead of
``--volume``, and ``--store`` sends the DICOM results back (credentials from the
environment: M3NET_DICOMWEB_USER and M3NET_DICOMWEB_PASSWORD, M3NET_DICOMWEB_TOKEN, or
M3NET_DICOMWEB_CREDENTIALS naming a JSON file).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="m3net_batch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", help="CT image file or DICOM folder (or --dicomweb)")
    parser.add_argument("--points", required=True, help=".mrk.json, x,y,z CSV or LUNA16 annotations.csv")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default="demo", help="'demo' or a model file from `m3net train`")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--coords", default="LPS", choices=("LPS", "RAS"), help="coordinates of a plain CSV")
    parser.add_argument("--series-uid", help="DICOM series (and LUNA16 rows) to use")
    parser.add_argument("--per-scale", action="store_true", help="also make micro/meso/macro heatmap nodes")
    parser.add_argument("--no-render", action="store_true", help="skip the PNG per nodule")
    parser.add_argument("--report", action="store_true", help="also overview PNGs and report.html")
    parser.add_argument("--dicom", action="store_true", help="also a DICOM SR and Parametric Maps in DIR/dicom")
    parser.add_argument("--dicomweb", metavar="URL", help="read the CT from this DICOMweb service")
    parser.add_argument("--study", metavar="UID", help="StudyInstanceUID of the CT on the --dicomweb service")
    parser.add_argument("--store", action="store_true", help="send the DICOM results back to --dicomweb")
    args = parser.parse_args(argv)
    if bool(args.volume) == bool(args.dicomweb):
        parser.error("give --volume CT or --dicomweb URL --study UID (one of them)")
    if bool(args.dicomweb) != bool(args.study):
        parser.error("--dicomweb and --study go together")
    if args.store and not args.dicomweb:
        parser.error("--store sends the DICOM results to the --dicomweb service")
    args.dicom = args.dicom or args.store
    if args.dicom and args.volume and not Path(args.volume).is_dir():
        parser.error(f"--dicom needs a DICOM series as input (a folder or --dicomweb); {args.volume} is a file")
    return args


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
    from m3netcore.points import points_for_image, read_points, unique_labels
    from m3netcore.provenance import provenance
    from m3netcore.results import write_results

    started = time.perf_counter()
    download = tempfile.TemporaryDirectory(prefix="m3net-dicomweb-")
    volume_path, series_uid, client = args.volume, args.series_uid, None
    if args.dicomweb:  # fetched before the output folder is touched
        from m3netcore.dicomweb import connect, retrieve_ct_series

        client = connect(args.dicomweb)
        series_uid = retrieve_ct_series(client, args.study, args.series_uid, download.name)
        volume_path = download.name
    # The folder is the run's: a second run into it is refused, and the whole set (results,
    # heatmaps, PNGs, scene) replaces the previous run's at once, or nothing changes.
    with download, OutputFolder(args.out) as staging:
        folder = Path(volume_path).is_dir()  # --series-uid picks a DICOM series, or LUNA rows for an image file
        image = m3netcore.read_image(volume_path, series_uid=series_uid if folder else None)
        if series_uid is not None and not folder:
            points = read_points(args.points, coords=args.coords, series_uid=series_uid)
        else:
            points = points_for_image(args.points, image, volume_path, coords=args.coords)  # LUNA: this series
        scene, application_logic, volume_rendering_logic, _keep_alive = _application()
        logic = M3NetLogic(scene, volume_rendering_logic)
        model = logic.load_model(args.model)
        name = args.volume or f"study {args.study}"
        volume, markups = _input_nodes(scene, image, name, points, unique_labels(p.label for p in points))
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
        # The same provenance the Slicer module puts on its table and `m3net predict` writes.
        record = provenance(image, volume_path, model, output.device, model_source=args.model)
        if args.dicomweb:
            record["input"].pop("path", None)
            record["input"]["dicomweb"] = args.dicomweb
        source = {"image": str(args.volume or args.dicomweb), "points": str(args.points)}
        write_results(results, labels, staging, source=source, provenance=record)
        if views is not None:
            _render_nodules(logic, output, views, staging)
        save_scene(scene, staging / "scene")
        written = _write_report_and_dicom(args, staging, image, volume_path, series_uid, model, record, labels,
                                          results)  # fmt: skip
    for nodule in output.nodules:
        print(f"{nodule.label}: p={nodule.probability:.3f} ({nodule.prediction})")
    print(f"{len(results)} nodule(s) on {output.device} in {time.perf_counter() - started:.1f} s -> {args.out}")
    if args.store and written is not None:
        from m3netcore.dicomweb import store_files

        stored = store_files(client, [Path(args.out) / "dicom" / path.name for path in written.paths])
        print(f"stored {len(stored)} objects in study {args.study} on {args.dicomweb}")
    return 0


def _write_report_and_dicom(args, staging, image, volume_path, series_uid, model, record, labels, results):
    """``--report`` and ``--dicom``: the same files ``m3net predict`` writes; returns the DICOM files written."""
    if args.report:
        from m3netcore.report import ReportWriter

        report = ReportWriter(staging, image, model, provenance=record)
        for label, result in zip(labels, results, strict=True):
            report.add(label, result)
        report.close()
    if not args.dicom:
        return None
    from m3netcore.dicom_out import read_series_headers, write_dicom_results

    ct = read_series_headers(volume_path, series_uid or record["input"].get("series_instance_uid"))
    return write_dicom_results(results, labels, ct, staging / "dicom", model=model, provenance=record)


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
