"""``m3net train``, ``cv`` and ``evaluate``: train on a cache, cross-validate, and report a model's metrics."""

from __future__ import annotations

import argparse
import sys

from m3netcore.commands.out_paths import check_out_dir


def add_training_commands(commands: argparse._SubParsersAction) -> None:
    """The ``train``, ``cv`` and ``evaluate`` subcommands of ``m3net``."""
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


def _run_train(args: argparse.Namespace) -> int:
    from m3netcore.errors import M3NetInputError
    from m3netcore.train.run import train_run

    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise M3NetInputError(f"--stop-after-epoch must be >= 1, got {args.stop_after_epoch}")
    config = _run_config(args)
    if config is None and not args.resume:
        from m3netcore.train.config import RunConfig

        config = RunConfig()
    check_out_dir(args.out)
    with _run_folder_held(args.out):
        train_run(args.data, args.model, _fold(args.fold), args.out, config, resume=args.resume,
                  stop_after_epoch=args.stop_after_epoch, device=args.device, progress=True)  # fmt: skip
    return 0


def _run_cv(args: argparse.Namespace) -> int:
    from m3netcore.errors import M3NetInputError
    from m3netcore.evaluation.cv import cross_validate
    from m3netcore.evaluation.workers import parse_devices

    devices = []
    if args.devices is not None:
        if args.device != "auto":
            raise M3NetInputError("give --device (one device) or --devices (several), not both")
        devices = parse_devices(args.devices)
    check_out_dir(args.out)
    with _run_folder_held(args.out):
        cross_validate(args.data, args.model, args.out, _run_config(args), seeds=args.seeds, device=args.device,
                       devices=devices, progress=True)  # fmt: skip
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from m3netcore.errors import M3NetInputError
    from m3netcore.evaluation.cv import is_cross_validation
    from m3netcore.evaluation.evaluate import CALLED_METRICS, evaluate_cross_validation, evaluate_model, seen_warning
    from m3netcore.outputs import OutputFolder

    cv = is_cross_validation(args.model)
    if cv and (args.fold is not None or args.protocol is not None):
        raise M3NetInputError("a cross-validation folder is evaluated on its own folds and protocol: "
                              "leave out --fold and --protocol")  # fmt: skip
    if not cv and args.data is None:
        raise M3NetInputError("--data CACHE is needed to evaluate a run folder or a model file")
    out = args.out if args.out is not None or not Path(args.model).is_dir() else str(Path(args.model) / "evaluation")
    if out is None:  # a missing path, or a model file without --out: evaluate_model refuses it, saying which
        evaluate_model(args.model, args.data, fold=args.fold, out=None, protocol=args.protocol, device=args.device)
    check_out_dir(out)
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


def _fold(text: str) -> int | None:
    """``--fold``: a fold number, or ``all`` (``None``) for no held-out fold."""
    if text.strip().lower() == "all":
        return None
    from m3netcore.errors import M3NetInputError

    try:
        return int(text)
    except ValueError:
        raise M3NetInputError(f"--fold: a fold number or 'all', not {text!r}") from None


def _run_folder_held(out: str):
    """The lock on a training run folder (only rank 0 of a torchrun job holds it: the ranks share one run)."""
    import contextlib
    import os

    from m3netcore.outputs import run_folder_lock

    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return run_folder_lock(out)
