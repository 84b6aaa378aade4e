"""``m3net bundle`` and ``m3net export``: make a model file from a run, and export one to ONNX.

``m3net bundle RUN --name NAME --version V --out FILE [--register]`` writes the run's model
anywhere with a new name, version and card, prints the card and its SHA-256, and with
``--register`` names it in the user's registry (:mod:`m3netcore.user_models`) so that
``--model NAME`` finds it; nothing is written into the installed package.

``m3net export MODEL --format onnx --out FILE`` writes the network as ONNX
(:mod:`m3netcore.export`).
"""

from __future__ import annotations

import argparse


def add_model_file_commands(commands: argparse._SubParsersAction) -> None:
    """The ``bundle`` and ``export`` subcommands of ``m3net``."""
    bundle = commands.add_parser(
        "bundle", help="a finished training run as a named model file (card, sha256), optionally registered"
    )
    bundle.add_argument("run_folder", metavar="RUN", help="a finished `m3net train` run folder")
    bundle.add_argument("--name", required=True, help="the model's name, e.g. lidc-phantom-v2 (what --model takes)")
    bundle.add_argument("--version", required=True, help="the model's version, e.g. 2")
    bundle.add_argument("--out", required=True, metavar="FILE", help="the model file to write (.safetensors)")
    bundle.add_argument("--note", default="", help="a paragraph put at the top of the model card")
    bundle.add_argument("--report", metavar="FILE", help="markdown appended to the card (e.g. the cv summary.md)")
    bundle.add_argument("--register", action="store_true",
                        help="name it in the user's model registry ($M3NET_MODELS or ~/.config/m3net/models) "
                             "so that --model NAME loads it")  # fmt: skip
    bundle.set_defaults(run=_run_bundle)

    export = commands.add_parser("export", help="a model's network as ONNX (the three views in, logit and "
                                                "scale attention out)")  # fmt: skip
    export.add_argument("model", metavar="MODEL", help="bundled or registered model name, or model file")
    export.add_argument("--format", required=True, choices=("onnx",), help="the export format")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write (.onnx)")
    export.set_defaults(run=_run_export)


def _run_bundle(args: argparse.Namespace) -> int:
    from m3netcore.errors import M3NetInputError
    from m3netcore.train.bundle import bundle_run

    if not args.name.strip() or any(c in args.name for c in "/\\"):
        raise M3NetInputError(f"--name must be a plain name without slashes, got {args.name!r}")
    entry = bundle_run(args.run_folder, args.name, args.version, note=args.note, report=args.report, out=args.out)
    print(entry["card"].strip())
    print()
    print(f"model    {entry['name']} version {entry['version']}")
    print(f"sha256   {entry['sha256']}")
    print(f"wrote {entry['file']}")
    if args.register:
        from m3netcore.user_models import register_model

        registry = register_model(args.name, entry["file"], entry["sha256"], args.version)
        print(f"registered {args.name!r} in {registry}: use --model {args.name}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from m3netcore.checkpoint import load_model
    from m3netcore.export import export_onnx

    model = load_model(args.model)
    written = export_onnx(model, args.out)
    shapes = ", ".join(f"{name} (N, {', '.join(map(str, written['shapes'][name][1:]))})" for name in written["inputs"])
    print(f"inputs   {shapes}: float32 crops, HU-windowed to [0, 1]")
    print(f"outputs  {', '.join(written['outputs'])} (logit before calibration: temperature "
          f"{model.temperature:.3f}, threshold {model.threshold:.3f})")  # fmt: skip
    print(f"sha256   {written['sha256']}")
    print(f"wrote {args.out}")
    return 0
