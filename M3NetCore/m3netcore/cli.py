"""The ``m3net`` command: predict, demo, model-info, lidc, train, cv, evaluate, bundle, export.

Each command group lives in its own module of :mod:`m3netcore.commands`; this one assembles
the parser and runs a command. Heavy modules (torch, SimpleITK) are imported inside the
commands so ``m3net --help`` answers at once. Bad input ends with one ``m3net: error: ...``
line and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence

from m3netcore.commands.benchmark import add_benchmark_commands
from m3netcore.commands.lidc import add_lidc_commands
from m3netcore.commands.model_files import add_model_file_commands
from m3netcore.commands.predict import add_predict_commands
from m3netcore.commands.training import add_training_commands

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
    parser = argparse.ArgumentParser(
        prog="m3net",
        description="Lung nodule malignancy from micro, meso and macro views of a CT (M3Net). "
        "Research software, not for clinical use.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_predict_commands(commands)  # predict, demo, model-info, predict-many
    add_model_file_commands(commands)  # bundle, export
    add_lidc_commands(commands)
    add_training_commands(commands)  # train, cv, evaluate
    add_benchmark_commands(commands)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
