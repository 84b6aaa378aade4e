"""Write files so that a crash never leaves a half-written one under the final name."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The path at or above ``folder`` that exists as a file, so that ``folder`` cannot be made; None if none."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The temporary name ends with the final name's full suffix (``.nii.gz`` too), so writers
    that choose a format by extension (SimpleITK, matplotlib) do the right thing. The file
    is created with the permissions a plain ``open`` gives and synced to disk before the move.
    """
    final = Path(path)
    if final.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(final))
    blocking = file_in_the_way(final.parent)
    if blocking is not None:
        raise NotADirectoryError(errno.ENOTDIR, f"is a file, so {final} cannot be written", str(blocking))
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    base = final.name[: len(final.name) - len("".join(final.suffixes))] or "file"
    temporary = final.with_name(f".{base}.{secrets.token_hex(6)}.partial{suffix}")
    with open(temporary, "xb"):  # claim the name; honours the umask
        pass
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
