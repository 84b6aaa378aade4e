"""Output paths the commands refuse before any work: a file in the way of a folder, a folder in the way of a file.

Shared by the command modules; it lives here rather than in :mod:`m3netcore.cli` because
``python -m m3netcore.cli`` runs that module as ``__main__``, and importing it back from a
command would load a second copy.
"""

from __future__ import annotations


def check_out_dir(out: str, option: str = "--out") -> None:
    """Refuse an output path that cannot become a folder before any work is done."""
    from m3netcore.atomic import file_in_the_way
    from m3netcore.errors import M3NetInputError

    blocking = file_in_the_way(out)
    if blocking is not None:
        raise M3NetInputError(f"{option} {out}: {blocking} exists and is not a folder")


def check_out_file(out: str, option: str) -> None:
    """Refuse an output file path that a folder, or a file above it, is in the way of, before any work is done."""
    from pathlib import Path

    from m3netcore.atomic import file_in_the_way
    from m3netcore.errors import M3NetInputError

    if Path(out).is_dir():
        raise M3NetInputError(f"{option} {out} is a folder, not a file")
    blocking = file_in_the_way(Path(out).parent)
    if blocking is not None:
        raise M3NetInputError(f"{option} {out}: {blocking} exists and is not a folder")
