"""A run's output folder: one run at a time, results replaced as a whole set, nothing else touched.

``OutputFolder`` is how every command that writes a set of results (``m3net predict``,
``m3net demo``, ``m3net evaluate``, the Slicer batch script) owns its folder::

    from m3netcore.outputs import OutputFolder

    with OutputFolder("results") as staging:    # locks results/, gives an empty staging folder
        write_everything_into(staging)          # files and subfolders, any names
    # success: the set is in results/, replacing the earlier run's set; error: results/ unchanged

What it guarantees:

- **One run per folder.** ``results/.m3net.lock`` is held with an operating-system lock
  (``flock``; ``msvcrt.locking`` on Windows) for the whole run, so a second run into the
  same folder is refused at once with :class:`OutputFolderBusy`. The kernel drops the lock
  when the process ends, however it ends (exit, exception, SIGKILL), so a crash never
  leaves a folder locked; the lock file is removed on a normal exit.
- **All or nothing.** Files are written into a hidden staging folder inside the target
  (``results/.m3net-staging-*``, same file system, so moves are renames) and moved into
  place only when the block succeeds, in the order they were written (so an index such
  as ``results.json``, written last, appears last), with SIGINT/SIGTERM held back during
  the moves. On an error or an interrupt the staging folder is deleted and the target is
  as before (a folder this run created is removed again if it is still empty). A staging
  folder left by a killed run is deleted by the next run into the folder.
- **Earlier results replaced as a set.** What a run wrote is recorded in
  ``results/.m3net-files.json``. The next run's commit removes the earlier run's files it
  does not write again (a 1-nodule run after a 3-nodule run leaves no old heatmaps).
- **Other files are never touched.** A file the run would write over that no m3net run
  wrote (it is not in the record) stops the commit before anything is moved, with
  :class:`OutputConflict` naming the file; files the user put beside the results, or into
  a subfolder the run writes into, stay.
- **Errors name the user's paths.** An ``OSError`` raised in the block that names a
  file in the staging folder is re-raised naming the final path, and a folder that cannot
  be written is named itself, never a hidden temporary name.

``run_folder_lock(path)`` is the lock alone, for folders a run fills over time and must
keep after a crash (``m3net train`` run folders with their checkpoints, ``m3net cv``
folders): there staging would defeat ``--resume``. ``user_entries(path)`` lists a folder
without these hidden ``.m3net*`` entries, for "is this folder empty?" checks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from m3netcore.errors import M3NetInputError

LOCK_NAME = ".m3net.lock"
MANIFEST_NAME = ".m3net-files.json"
STAGING_PREFIX = ".m3net-staging-"
RESERVED_PREFIX = ".m3net"  # names of the machinery, never results, never the user's


class OutputFolderBusy(M3NetInputError):
    """Another run holds the output folder."""


class OutputConflict(M3NetInputError):
    """A file the run would replace was not written by an earlier m3net run."""


def is_reserved(name: str) -> bool:
    """Whether a folder entry's name belongs to this module's machinery (lock, record, staging)."""
    return name.startswith(RESERVED_PREFIX)


def user_entries(folder: str | os.PathLike) -> list[Path]:
    """The entries of ``folder`` other than the hidden ``.m3net*`` machinery (empty if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not is_reserved(p.name))


class OutputFolder:
    """Own ``path`` for one run: lock it, stage the results, swap them in as a set on success.

    Args:
        path: the output folder; created (with its parents) if missing.

    Use it as a context manager; ``__enter__`` returns the staging folder (a ``Path``) to
    write into. ``commit()`` and ``discard()`` are the same steps called by hand (after
    ``open()``). After a commit, ``written`` lists the files moved in (relative paths).

    Raises:
        OutputFolderBusy: another live process holds the folder.
        OutputConflict: at commit, a file the run would replace was not written by m3net.
        OSError: the folder cannot be made or written (naming the folder).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.staging: Path | None = None
        self.written: list[str] = []
        self._lock: _FolderLock | None = None
        self._created = False

    # --- context manager ---------------------------------------------------------------

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
            return
        mapped = self._in_user_terms(exc)  # while the staging folder is known
        self.discard()
        if mapped is not exc:
            raise mapped from exc

    # --- steps -------------------------------------------------------------------------

    def open(self) -> Path:
        """Make and lock the folder, clear what killed runs left, make an empty staging folder."""
        self._created, self._lock = _make_and_lock(self.path)
        try:
            for stale in self.path.glob(f"{STAGING_PREFIX}*"):  # ours: we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            try:
                self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
            except OSError as err:
                raise _about_folder(err, self.path) from err
        except BaseException:
            self._release()
            raise
        return self.staging

    def commit(self) -> list[str]:
        """Move the staged files into the folder, replacing the earlier run's set; release the lock."""
        if self.staging is None:
            raise RuntimeError("OutputFolder.commit() before open()")
        new_files = _files_in_write_order(self.staging)
        new_dirs = sorted({parent.as_posix() for f in new_files for parent in Path(f).parents} - {"."})
        old = _read_record(self.path)
        self._check_no_foreign(new_files, old["files"])
        with _signals_held():
            # The record first holds both sets, so a process killed mid-commit leaves nothing unaccounted for.
            _write_record(self.path, self.staging, sorted(set(old["files"]) | set(new_files)),
                          sorted(set(old["dirs"]) | set(new_dirs)))  # fmt: skip
            for name in new_files:
                final = self.path / name
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(self.staging / name, final)
                except OSError as err:
                    raise self._in_user_terms(err) from err
            for name in sorted(set(old["files"]) - set(new_files)):
                stale = self.path / name
                if stale.is_file() or stale.is_symlink():
                    stale.unlink()
            for name in sorted(set(old["dirs"]) - set(new_dirs), key=lambda d: -d.count("/")):
                with contextlib.suppress(OSError):  # not empty: the user's files are in it
                    (self.path / name).rmdir()
            _write_record(self.path, self.staging, new_files, new_dirs)
        self.written = new_files
        self._release()
        return new_files

    def discard(self) -> None:
        """Delete the staging folder and release the lock; the folder's earlier content stays."""
        self._release(remove_if_created=True)

    # --- helpers -------------------------------------------------------------------------

    def _check_no_foreign(self, new_files: list[str], old_files: list[str]) -> None:
        ours = set(old_files)
        for name in new_files:
            final = self.path / name
            parts = Path(name).parts
            for depth in range(1, len(parts)):
                above = self.path.joinpath(*parts[:depth])
                if above.exists() and not above.is_dir():
                    raise OutputConflict(f"{above} is a file in the way of {final}; move it away or choose another "
                                         "output folder")  # fmt: skip
            if final.is_dir() and not final.is_symlink():
                raise OutputConflict(f"{final} is a folder where this run writes a file; move it away or choose "
                                     "another output folder")  # fmt: skip
            if (final.exists() or final.is_symlink()) and name not in ours:
                raise OutputConflict(
                    f"{final} exists and was not written by an earlier m3net run into this folder; "
                    "it is left as it is: move it away or choose another output folder"
                )

    def _in_user_terms(self, err: BaseException) -> BaseException:
        """An OSError about a staged file, re-made to name the final path instead."""
        if not isinstance(err, OSError) or self.staging is None or err.errno is None:
            return err
        staging = str(self.staging)

        def final(name):
            if name is None:
                return None
            text = os.fspath(name)
            if isinstance(text, str) and (text == staging or text.startswith(staging + os.sep)):
                return str(self.path / os.path.relpath(text, staging))
            return name

        filename, filename2 = final(err.filename), final(err.filename2)
        if filename == err.filename and filename2 == err.filename2:
            return err
        return type(err)(err.errno, err.strerror, filename, None, filename2)

    def _release(self, *, remove_if_created: bool = False) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if remove_if_created and self._created:
                with contextlib.suppress(OSError):  # not empty: keep it
                    self.path.rmdir()


@contextlib.contextmanager
def run_folder_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path`` (created if missing) for one run that writes into it over time; yields the folder.

    The lock only: files are written in place (training keeps its checkpoints after a
    crash so that ``--resume`` can continue). A folder this call created is removed again
    if the run left it empty.

    Raises:
        OutputFolderBusy: another live process holds the folder.
    """
    path = Path(path)
    created, lock = _make_and_lock(path)
    try:
        yield path
    finally:
        lock.release()
        if created and not user_entries(path):
            with contextlib.suppress(OSError):
                path.rmdir()


# --- private ---------------------------------------------------------------------------------


class _FolderLock:
    """An exclusive OS lock on ``folder/.m3net.lock`` (flock; msvcrt on Windows)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputFolderBusy(
                    f"{self.path.parent} is in use by another m3net run{holder}; wait for it to finish or choose "
                    "another output folder"
                )
            # The holder before us may have removed the file after we opened it: lock the file at the name.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        if os.name != "nt":  # removed while still held, so no one locks a file about to vanish
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)  # closing drops the lock
        self.fd = None


def _make_and_lock(path: Path) -> tuple[bool, _FolderLock]:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(path))
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _about_folder(err, _nearest_existing(path)) from err
    lock = _FolderLock(path)
    try:
        lock.acquire()
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise _about_folder(err, path) from err
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return created, lock


def _about_folder(err: OSError, folder: Path) -> OSError:
    """The same error, naming the folder a user chose (or the one above it that cannot be written)."""
    if err.errno == errno.ENOENT or err.errno is None:
        return err
    return type(err)(err.errno, f"cannot write into this folder ({err.strerror})", str(folder))


def _nearest_existing(path: Path) -> Path:
    """The folder that refused a new folder in it: the nearest existing ancestor of ``path``."""
    return next((p for p in path.parents if p.exists()), path)


def _try_lock(fd: int) -> bool:
    if os.name == "nt":  # pragma: no cover - Windows (Slicer) only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except (OSError, AttributeError):
        return ""
    if len(text) >= 2 and text[0].isdigit():
        return f" (process {text[0]} on {text[1]})"
    return ""


def _files_in_write_order(staging: Path) -> list[str]:
    """Relative paths (``/``-separated) of the staged files, oldest first, so an index written last moves last."""
    entries = []
    for root, _, files in os.walk(staging):
        for name in files:
            full = Path(root, name)
            entries.append((full.lstat().st_mtime_ns, full.relative_to(staging).as_posix()))
    return [name for _, name in sorted(entries)]


def _read_record(folder: Path) -> dict:
    """The earlier run's files and folders; an unreadable or hostile record counts as none."""
    empty: dict = {"files": [], "dirs": []}
    try:
        document = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty
    if not isinstance(document, dict):
        return empty
    return {key: [n for n in document.get(key, []) if _inside(n)] for key in ("files", "dirs")}


def _inside(name: object) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts and not is_reserved(path.parts[0])


def _write_record(folder: Path, staging: Path, files: list[str], dirs: list[str]) -> None:
    temporary = staging / ".record.json"
    temporary.write_text(json.dumps({"written_by": "m3net", "files": files, "dirs": dirs}, indent=2) + "\n",
                         encoding="utf-8")  # fmt: skip
    os.replace(temporary, folder / MANIFEST_NAME)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while files move, so Ctrl-C cannot split a set (main thread only)."""
    if os.name == "nt" or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "OutputConflict",
    "OutputFolder",
    "OutputFolderBusy",
    "is_reserved",
    "run_folder_lock",
    "user_entries",
]
