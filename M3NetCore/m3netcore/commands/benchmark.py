"""``m3net benchmark``: training throughput of the architectures, and the accuracy table."""

from __future__ import annotations

import argparse
import json

from m3netcore.commands.out_paths import check_out_dir, check_out_file


def add_benchmark_commands(commands: argparse._SubParsersAction) -> None:
    """The ``benchmark`` subcommand of ``m3net`` (``throughput``, ``accuracy``)."""
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



def _run_throughput(args: argparse.Namespace) -> int:
    import torch

    from m3netcore.errors import M3NetInputError
    from m3netcore.evaluation.throughput import measure, table
    from m3netcore.models import ARCHITECTURES
    from m3netcore.predict import resolve_device

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
    from m3netcore.evaluation.benchmark import accuracy_table, table_markdown
    from m3netcore.train.config import RunConfig, read_config

    try:
        check_protocol(args.protocol)
        config = (read_config(args.config) if args.config else RunConfig()).replace(epochs=args.epochs)
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
    check_out_dir(args.out)
    if args.json:
        check_out_file(args.json, "--json")  # before hours of training, not after
    rows = accuracy_table(args.data, args.protocol, args.out, rows=args.rows, config=config, device=args.device,
                          jobs=args.jobs, extra_data=args.extra_data, seeds=args.seeds)
    document = json.loads((Path(args.out) / "table.json").read_text(encoding="utf-8"))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    print(table_markdown(document), end="")
    return 0
