"""Bundle a finished training run's model with the package (``python -m m3netcore.train.bundle RUN --name N``).

For a model file anywhere, without writing into the package, use ``m3net bundle RUN --name N
--version V --out FILE [--register]``.

The run's ``model.safetensors`` is written under ``m3netcore/weights/`` with a new name,
version and a card that starts with what the bundled model is for, and the registry
(``weights/registry.json``) gets its SHA-256, which every load checks.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import REGISTRY_FILE, read_model_file, save_model
from m3netcore.errors import M3NetInputError

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def bundle_run(
    run: str | os.PathLike, name: str, version: str, *, note: str = "", report: str | os.PathLike | None = None,
    weights: str | os.PathLike = WEIGHTS, out: str | os.PathLike | None = None,
) -> dict:  # fmt: skip
    """Write ``RUN/model.safetensors`` as ``weights/m3net-<name>.safetensors`` and register it as ``name``.

    ``report``: a markdown file appended to the card, e.g. the ``summary.md`` of the recipe's
    ``m3net cv`` for a model trained on all folds (its held-out estimate). ``out``: write the
    model file there instead and register nothing (``m3net bundle --out``; see
    :mod:`m3netcore.user_models` for a name that finds it).

    Returns:
        ``{"name", "file", "sha256", "version", "card"}``.
    """
    source = Path(run) / "model.safetensors"
    if not source.is_file():
        raise M3NetInputError(f"{run} holds no finished run (no model.safetensors)")
    appendix = ""
    if report is not None:
        if not Path(report).is_file():
            raise M3NetInputError(f"no report file {report}")
        lines = Path(report).read_text(encoding="utf-8").splitlines()
        # one heading level down: the report is a section of the card
        appendix = "\n" + "\n".join("#" + line if line.startswith("#") else line for line in lines) + "\n"
    model = read_model_file(source)
    card = f"# Bundled model `{name}` {version}\n\n{note.strip()}\n\n" if note.strip() else ""
    model = replace(model, name=f"m3net-{name}", version=version, card=card + model.card + appendix)
    if out is not None:
        if Path(out).is_dir():
            example = Path(out) / f"m3net-{name}.safetensors"
            raise M3NetInputError(f"--out {out} is a folder; give the model file's path, e.g. {example}")
        digest = save_model(model, out)
        return {"name": name, "file": str(out), "sha256": digest, "version": version, "card": model.card}
    weights = Path(weights)
    target = weights / f"m3net-{name}.safetensors"
    digest = save_model(model, target)
    registry_path = weights / REGISTRY_FILE
    registry = json.loads(registry_path.read_text(encoding="utf-8")) if registry_path.exists() else {}
    registry[name] = {"file": target.name, "sha256": digest, "version": version}
    write_text_atomic(registry_path, json.dumps(registry, indent=2, sort_keys=True) + "\n")
    return {"name": name, "file": str(target), "sha256": digest, "version": version, "card": model.card}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished `m3net train` run folder")
    parser.add_argument("--name", required=True, help="registry name, e.g. lidc-phantom")
    parser.add_argument("--version", required=True)
    parser.add_argument("--note", default="", help="a paragraph put at the top of the model card")
    parser.add_argument("--report", metavar="FILE", help="markdown appended to the card (e.g. the cv summary.md)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(bundle_run(args.run, args.name, args.version, note=args.note, report=args.report), indent=2))
    except M3NetInputError as err:
        parser.exit(2, f"bundle: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
