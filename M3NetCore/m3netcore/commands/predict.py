"""``m3net predict``, ``demo``, ``model-info`` and ``predict-many``: a model on CTs, and what a model is."""

from __future__ import annotations

import argparse
import json
import sys

from m3netcore.commands.out_paths import check_out_dir


def add_predict_commands(commands: argparse._SubParsersAction) -> None:
    """The ``predict``, ``demo``, ``model-info`` and ``predict-many`` subcommands of ``m3net``."""
    predict = commands.add_parser("predict", help="probability, scale attention and heatmaps for nodules in a CT")
    predict.add_argument(
        "image", nargs="?", help="CT: DICOM series folder, .nrrd, .nii(.gz), .mha or .mhd (or use --dicomweb)"
    )
    predict.add_argument("--point", action="append", default=[], metavar="X,Y,Z", help="a nodule point in mm")
    predict.add_argument(
        "--points", metavar="FILE", help="Slicer .mrk.json, CSV with x,y,z[,label], or LUNA16 annotations.csv"
    )
    predict.add_argument(
        "--coords", choices=("lps", "ras"), default="lps", help="system of --point and plain CSV (default lps)"
    )
    predict.add_argument("--series", metavar="UID", help="SeriesInstanceUID, for a folder with several series")
    predict.add_argument("--model", default="demo", metavar="NAME|PATH", help="bundled model name or model file")
    predict.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    predict.add_argument("--no-explain", action="store_true", help="skip the Grad-CAM heatmaps")
    predict.add_argument("--out", required=True, metavar="DIR", help="output folder")
    predict.add_argument("--report", action="store_true", help="also an overview PNG per nodule and report.html")
    predict.add_argument(
        "--dicom", action="store_true",
        help="also a DICOM SR (TID 1500) and a Parametric Map per nodule in DIR/dicom (DICOM input only)",
    )  # fmt: skip
    predict.add_argument("--dicomweb", metavar="URL", help="read the CT from this DICOMweb service (WADO-RS)")
    predict.add_argument("--study", metavar="UID", help="StudyInstanceUID of the CT on the --dicomweb service")
    predict.add_argument(
        "--store", action="store_true", help="send the SR and heatmaps back to the --dicomweb service (STOW-RS)"
    )
    predict.set_defaults(run=_run_predict)

    demo = commands.add_parser("demo", help="generate a CT with two nodules and run the demo model on it")
    demo.add_argument("--out", default="m3net-demo", metavar="DIR", help="output folder (default m3net-demo)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the generated CT")
    demo.set_defaults(run=_run_demo)

    info = commands.add_parser("model-info", help="parameters, GFLOPs per nodule and input spec of a model")
    info.add_argument(
        "--model", default="demo", metavar="NAME|PATH", help="bundled model, architecture name or model file"
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_run_model_info)
    _add_predict_many_command(commands)


def _run_predict(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from m3netcore import load_model
    from m3netcore.errors import M3NetInputError
    from m3netcore.geometry import to_lps
    from m3netcore.io import read_image_and_files
    from m3netcore.outputs import OutputFolder
    from m3netcore.points import LabeledPoint, parse_point, points_for_image, unique_labels
    from m3netcore.predict import iter_predict, resolve_device
    from m3netcore.provenance import provenance
    from m3netcore.results import ResultsWriter

    check_out_dir(args.out)
    _check_predict_input(args)
    points = [
        LabeledPoint(f"P-{n}", tuple(to_lps([parse_point(text)], args.coords)[0]))
        for n, text in enumerate(args.point, start=1)
    ]
    if not points and not args.points:
        raise M3NetInputError("no points: give --point X,Y,Z or --points FILE")
    client = None
    with tempfile.TemporaryDirectory(prefix="m3net-dicomweb-") as download:
        image_path, series = args.image, args.series
        if args.dicomweb:  # fetched before the output folder is touched: a wrong UID changes nothing
            from m3netcore.dicomweb import connect, retrieve_ct_series

            client = connect(args.dicomweb)
            series = retrieve_ct_series(client, args.study, args.series, download)
            image_path = download
        with OutputFolder(args.out) as staging:  # a second run into --out is refused here, before any work
            # LUNA16/LUNA25 files are filtered by the image's series, so the image is read first.
            image, files = read_image_and_files(image_path, series_uid=series)
            if args.points:
                points += points_for_image(args.points, image, image_path, coords=args.coords)
            model = load_model(args.model)
            labels = unique_labels(p.label for p in points)
            record = provenance(image, image_path, model, str(resolve_device(args.device)), model_source=args.model,
                                dicom_files=files if Path(image_path).is_dir() else None)  # fmt: skip
            if args.dicomweb:
                record["input"].pop("path", None)
                record["input"]["dicomweb"] = args.dicomweb
            extra = _predict_extra_writers(args, staging, image, image_path, series, model, record)
            results = iter_predict(
                model, image, [p.lps for p in points], coords="LPS", explain=not args.no_explain, device=args.device
            )
            source = {"image": str(args.dicomweb or args.image), "model": str(args.model)}
            with ResultsWriter(staging, source=source, provenance=record) as writer:  # heatmaps leave memory per chunk
                for label, result in zip(labels, results, strict=True):
                    for extra_writer in extra.values():
                        extra_writer.add(label, result)
                    writer.add(label, result)
                    print(_result_line(label, result))
                closed = {name: extra_writer.close() for name, extra_writer in extra.items()}
        print(f"wrote {args.out}/results.json, results.csv and {writer.heatmaps} heatmaps")
        if "report" in closed:
            print(f"wrote {args.out}/{closed['report'].name} and {len(extra['report'].rows)} overview PNGs")
        if "dicom" in closed:
            written = closed["dicom"]
            print(f"wrote {args.out}/dicom/{written.sr_path.name} and {len(written.map_paths)} Parametric Maps")
            if args.store:
                from m3netcore.dicomweb import store_files

                final = [Path(args.out) / "dicom" / path.name for path in written.paths]
                stored = store_files(client, final)  # the results are in --out whatever the store does
                print(f"stored {len(stored)} objects in study {args.study} on {args.dicomweb} "
                      f"(SR {written.sr_sop_instance_uid})")  # fmt: skip
    return 0


def _check_predict_input(args: argparse.Namespace) -> None:
    """One source of the CT (IMAGE or --dicomweb with --study), and options that fit it, before any work."""
    from pathlib import Path

    from m3netcore.errors import M3NetInputError

    if args.dicomweb and args.image:
        raise M3NetInputError(f"give IMAGE or --dicomweb, not both (IMAGE {args.image})")
    if not args.dicomweb and not args.image:
        raise M3NetInputError("no CT: give IMAGE (a DICOM folder or an image file) or --dicomweb URL --study UID")
    if args.dicomweb and not args.study:
        raise M3NetInputError("--dicomweb needs --study UID (the StudyInstanceUID of the CT)")
    if args.study and not args.dicomweb:
        raise M3NetInputError("--study applies to --dicomweb only; for a DICOM folder give the folder as IMAGE")
    if args.store and not args.dicomweb:
        raise M3NetInputError("--store sends the DICOM results to the --dicomweb service; give --dicomweb and --study")
    if args.store:
        args.dicom = True
    if args.dicom and args.image and not Path(args.image).is_dir():
        raise M3NetInputError(
            f"--dicom needs a DICOM series as input (a folder of DICOM files, or --dicomweb): {args.image} is a "
            "file without the patient, study and frame of reference a DICOM result must refer to"
        )


def _predict_extra_writers(args, staging, image, image_path, series, model, record) -> dict:
    """The writers ``--report`` and ``--dicom`` add, keyed by option; each has add(label, result) and close()."""
    writers = {}
    if args.report:
        from m3netcore.report import ReportWriter

        writers["report"] = ReportWriter(staging, image, model, provenance=record)
    if args.dicom:
        from m3netcore.dicom_out import DicomWriter, read_series_headers

        ct = read_series_headers(image_path, series or record["input"].get("series_instance_uid"))
        writers["dicom"] = DicomWriter(staging / "dicom", ct, model=model,
                                       software_version=record["software"]["version"])  # fmt: skip
    return writers


def _run_demo(args: argparse.Namespace) -> int:
    from m3netcore.demo import run_demo

    check_out_dir(args.out)
    for line in run_demo(args.out, seed=args.seed):
        print(line)
    return 0


def _run_model_info(args: argparse.Namespace) -> int:
    from m3netcore.checkpoint import Model, bundled_registry, load_model
    from m3netcore.models import ARCHITECTURES
    from m3netcore.summary import model_summary

    name = args.model
    if name in ARCHITECTURES and name not in bundled_registry():
        model = Model.untrained(name)
    else:
        model = load_model(name)
    summary = model_summary(model)
    if args.json:
        print(json.dumps(summary | {"card": model.card}, indent=2))
        return 0
    print(f"model         {summary['name']} (architecture {summary['architecture']}, version {summary['version']})")
    print(f"parameters    {summary['parameters']:,}")
    print(f"GFLOPs/nodule {summary['gflops']:.3f} (a multiply-add = 2 FLOPs; {summary['gmacs']:.3f} GMACs)")
    low, high = summary["hu_window"]
    print(f"HU window     {low:.0f}..{high:.0f}, outside = {summary['outside_hu']:.0f}")
    for spec in summary["inputs"]:
        fov = "x".join(f"{v:g}" for v in spec["field_of_view_mm"])
        grid = "x".join(str(v) for v in spec["grid_xyz"])
        spacing = "x".join(f"{v:g}" for v in spec["spacing_mm"])
        print(f"input {spec['scale']:<7} {fov} mm on {grid} voxels ({spacing} mm)")
    print(f"calibration   temperature {summary['temperature']:.3f}, threshold {summary['threshold']:.3f}")
    print()
    print(model.card.strip() or "(no model card)")
    return 0


def _add_predict_many_command(commands) -> None:
    many = commands.add_parser(
        "predict-many", help="predict every CT of a manifest, resumably, on all local cores or a Dask cluster"
    )
    many.add_argument("manifest", metavar="MANIFEST",
                      help="CSV with columns image, points[, series_uid]; image: a file, a DICOM folder or "
                           "a DICOMweb study URL; paths relative to its folder")  # fmt: skip
    many.add_argument("--out", required=True, metavar="DIR",
                      help="output folder: cts/<name>/ per CT, results.csv, failures.csv")  # fmt: skip
    many.add_argument("--model", default="demo", metavar="NAME|PATH", help="bundled model name or model file")
    many.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    many.add_argument(
        "--coords", choices=("lps", "ras"), default="lps", help="system of plain CSV points files (default lps)"
    )
    many.add_argument("--no-explain", action="store_true", help="skip the Grad-CAM heatmaps")
    where = many.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N", help="local worker processes (default: one per CPU core)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="use the workers of an existing Dask scheduler, e.g. tcp://10.1.2.3:8786")  # fmt: skip
    many.add_argument("--read-ahead", type=int, default=1, metavar="N",
                      help="CTs each local worker reads while its network runs; their nodules share forward passes "
                           "(default 1; more for a GPU; with --scheduler the workers' threads decide)")  # fmt: skip
    many.set_defaults(run=_run_predict_many)


def _run_predict_many(args: argparse.Namespace) -> int:
    from m3netcore.batch import FAILURES_CSV, RESULTS_CSV, run_batch

    check_out_dir(args.out)
    summary = run_batch(args.manifest, args.out, model=args.model, device=args.device, coords=args.coords.upper(),
                        explain=not args.no_explain, workers=args.workers, scheduler=args.scheduler,
                        read_ahead=args.read_ahead, report=lambda line: print(line, flush=True))  # fmt: skip
    print(f"{summary.done} done, {summary.skipped} finished before, {summary.failed} failed; {summary.nodules} "
          f"nodules in {args.out}/{RESULTS_CSV} ({summary.seconds:.1f} s)")  # fmt: skip
    if summary.failed:
        print(f"m3net: {summary.failed} CTs failed: see {args.out}/{FAILURES_CSV}", file=sys.stderr)
        return 1
    return 0


def _result_line(label: str, result) -> str:
    line = f"{label}: probability {result.probability:.3f} ({result.label})"
    if result.scale_attention:
        line += ", attention " + ", ".join(f"{k} {v:.2f}" for k, v in result.scale_attention.items())
    return line
