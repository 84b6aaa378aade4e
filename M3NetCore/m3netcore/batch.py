"""``m3net predict-many``: every CT of a manifest, resumable, on local processes or a Dask cluster.

A manifest is a CSV file with one row per CT::

    image,points,series_uid
    scans/ct-001.nrrd,points/ct-001.mrk.json,
    dicom/patient-7,annotations.csv,1.2.840.113654.2.55.19

``image`` is an image file or a DICOM series folder, ``points`` any points file
``m3net predict --points`` reads (a LUNA16/LUNA25 file of many series is matched to each
image), ``series_uid`` optional; relative paths are relative to the manifest's folder.

The output folder holds ``cts/<name>/`` per CT (exactly what ``m3net predict`` writes,
plus ``batch.json``, the completion record), ``results.csv`` (one row per nodule, the
CT's name, image and series first) and ``failures.csv`` (one row per CT that failed, with
a one-line reason). Why it can be stopped and rerun at any moment:

- each CT folder is an :class:`m3netcore.outputs.OutputFolder`: its set of files appears
  whole or not at all, so a worker killed mid-CT (or a Ctrl-C) leaves it as it was, and the
  CT is simply predicted again (Dask reruns the task of a dead worker);
- ``batch.json`` is written last into that set and holds the SHA-256 of the CT's files and
  points file and of the model, so a rerun skips a CT whose record matches;
- ``results.csv`` and ``failures.csv`` are written only by the coordinating process, one
  CT at a time as its task ends, from the CT folder's committed results.csv; each CT is
  appended once per run, so a task that ran twice never gives duplicate rows.

Workers are Dask (``distributed``) worker processes: a ``LocalCluster`` of one
single-threaded process per core by default, or those of an existing scheduler
(``--scheduler tcp://host:8786``, e.g. started by dask-jobqueue on SLURM). Each worker
loads the model once and keeps it. Dask rather than ``concurrent.futures`` because a
process pool breaks as a whole when one process is killed, while Dask's nanny restarts
the worker and reschedules only its task, and the same code then runs across machines.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from m3netcore.errors import M3NetInputError
from m3netcore.progress import Countdown

CT_FOLDER = "cts"
DONE_RECORD = "batch.json"
RESULTS_CSV = "results.csv"
FAILURES_CSV = "failures.csv"
IDENTITY_COLUMNS = ("ct", "image", "series_uid")
FAILURE_COLUMNS = (*IDENTITY_COLUMNS, "error")
NAME_CHARACTERS = 60  # of the image path kept in a CT folder's name, before its hash
RECORD_FORMAT = 1
BUSY_WAIT_S = 600.0  # how long a task waits for a CT folder that another task is writing


@dataclass(frozen=True)
class ManifestRow:
    """One CT of a manifest: its folder name, image and points files (absolute) and series."""

    name: str
    image_text: str  # as the manifest says it, for the tables
    image: Path
    points: Path
    series_uid: str | None


@dataclass(frozen=True)
class BatchOptions:
    """What every worker needs to predict a row: where to write and with which model."""

    out: Path
    model: str
    device: str = "auto"
    coords: str = "LPS"
    explain: bool = True
    torch_threads: int | None = None


@dataclass(frozen=True)
class RowOutcome:
    """How one CT ended: ``"done"``, ``"skipped"`` (finished before) or ``"failed"`` with a one-line error."""

    name: str
    status: str
    error: str = ""
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    nodules: int = 0
    seconds: float = 0.0


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """The rows of a manifest CSV (columns ``image``, ``points``, optional ``series_uid``).

    Raises:
        M3NetInputError: no such file, not a CSV, a missing column, no rows, an empty
            ``image`` or ``points`` cell, the same CT (image and series) twice.
    """
    path = Path(path)
    if not path.is_file():
        raise M3NetInputError(f"no such manifest file: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {(name or "").strip().lower(): name for name in reader.fieldnames or ()}
            records = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise M3NetInputError(f"manifest {path} is not a readable CSV file: {err}") from err
    missing = [c for c in ("image", "points") if c not in columns]
    if missing:
        found = ", ".join(columns) or "none"
        raise M3NetInputError(f"manifest {path} has no column {' or '.join(missing)} "
                              f"(needs image, points and optionally series_uid; found {found})")  # fmt: skip
    base = path.resolve().parent
    rows, seen = [], {}
    for number, record in enumerate(records, start=2):  # line 1 is the header
        cells = {key: (record.get(name) or "").strip() for key, name in columns.items()}
        if not any(cells.values()):
            continue
        for key in ("image", "points"):
            if not cells[key]:
                raise M3NetInputError(f"manifest {path} line {number}: empty {key}")
        series = cells.get("series_uid") or None
        key = (cells["image"], series)
        if key in seen:
            raise M3NetInputError(f"manifest {path} line {number}: the same CT as line {seen[key]} ({cells['image']})")
        seen[key] = number
        rows.append(ManifestRow(name=ct_folder_name(cells["image"], series), image_text=cells["image"],
                                image=base / cells["image"], points=base / cells["points"],
                                series_uid=series))  # fmt: skip
    if not rows:
        raise M3NetInputError(f"manifest {path} has no rows (one row per CT under the header image,points)")
    return rows


def ct_folder_name(image_text: str, series_uid: str | None) -> str:
    """A CT's folder name: its image path made safe, plus a hash that keeps every CT's folder its own."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image_text).strip("._")[-NAME_CHARACTERS:].strip("._") or "ct"
    digest = hashlib.sha256(f"{image_text}\0{series_uid or ''}".encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def input_sha256(row: ManifestRow) -> str:
    """SHA-256 over the CT's files (a DICOM folder's every file), its points file and its series UID."""
    from m3netcore.checkpoint import file_sha256

    digest = hashlib.sha256(f"series {row.series_uid or ''}\n".encode())
    for path in _image_files(row.image):
        name = path.relative_to(row.image).as_posix() if row.image.is_dir() else path.name
        digest.update(f"image {name} {file_sha256(path)}\n".encode())
    digest.update(f"points {file_sha256(row.points)}\n".encode())
    return digest.hexdigest()


def predict_row(row: ManifestRow, options: BatchOptions) -> RowOutcome:
    """Predict one CT into its folder in ``options.out`` unless it is finished already (a worker's task).

    Errors of the CT (unreadable, no points, a point outside) come back as a ``"failed"``
    outcome with one line; only the death of the process makes Dask run it again.
    """
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # told by the coordinator, with the CT's name
        warnings.simplefilter("always")
        try:
            status, error = _predict_unless_finished(row, options), ""
        except Exception as err:  # noqa: BLE001 - any error of one CT is that CT's failure; the batch goes on
            status, error = "failed", one_line(err)
    told = tuple(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
    return RowOutcome(row.name, status, error=error, seconds=time.perf_counter() - start, warnings=told)


def run_batch(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str = "demo",
    device: str = "auto",
    coords: str = "LPS",
    explain: bool = True,
    workers: int | None = None,
    scheduler: str | None = None,
    report: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Predict every CT of ``manifest`` into ``out``; see the module's docstring for the layout.

    Args:
        manifest: the manifest CSV.
        out: the output folder (locked for the run).
        model: a bundled model name or a model file, loaded once per worker.
        device, coords, explain: as for ``m3net predict``.
        workers: local worker processes (default: one per CPU core this process may use).
        scheduler: address of an existing Dask scheduler instead of local workers.
        report: called with one progress line per CT.
        warn: called with each warning a CT gave (default: printed to stderr).

    Raises:
        M3NetInputError: a bad manifest, model, device or worker count; an unreachable scheduler.
    """
    from m3netcore.atomic import write_text_atomic
    from m3netcore.checkpoint import load_model
    from m3netcore.outputs import run_folder_lock
    from m3netcore.predict import resolve_device
    from m3netcore.results import CSV_COLUMNS

    if workers is not None and scheduler is not None:
        raise M3NetInputError("give --workers (local processes) or --scheduler (a Dask cluster), not both")
    if workers is not None and workers < 1:
        raise M3NetInputError(f"--workers must be at least 1, got {workers}")
    rows = read_manifest(manifest)
    model = model_for_workers(model)
    load_model(model)  # a bad model is one error now, not one failure per CT
    if scheduler is None:
        resolve_device(device)
    local_cpus = _usable_cpus()
    workers = workers or (None if scheduler else local_cpus)
    options = BatchOptions(out=Path(out).resolve(), model=model, device=device, coords=coords, explain=explain,
                           torch_threads=max(1, local_cpus // workers) if workers else None)  # fmt: skip
    summary = BatchSummary()
    start = time.perf_counter()
    with run_folder_lock(out):
        results_path, failures_path = Path(out) / RESULTS_CSV, Path(out) / FAILURES_CSV
        write_text_atomic(results_path, _csv_text([(*IDENTITY_COLUMNS, *CSV_COLUMNS)]))
        write_text_atomic(failures_path, _csv_text([FAILURE_COLUMNS]))
        by_name = {row.name: row for row in rows}
        outcomes = contextlib.closing(_outcomes(rows, options, workers, scheduler))  # stops the workers on any exit
        with open(results_path, "a", encoding="utf-8", newline="") as results, \
                open(failures_path, "a", encoding="utf-8", newline="") as failures, outcomes as ends:  # fmt: skip
            countdown = Countdown(len(rows))
            for number, outcome in enumerate(ends, start=1):
                row = by_name[outcome.name]
                identity = (row.name, row.image_text, row.series_uid or "")
                for message in outcome.warnings:
                    (warn or _print_warning)(message if str(row.image) in message else f"{row.image_text}: {message}")
                nodule_rows = []
                if outcome.status != "failed":
                    try:
                        nodule_rows = _folder_rows(options.out / CT_FOLDER / row.name)
                    except OSError as err:  # removed by hand since: a failure of this CT, not of the batch
                        outcome = RowOutcome(row.name, "failed", error=one_line(err))
                if outcome.status == "failed":
                    summary.failed += 1
                    _append(failures, [(*identity, outcome.error)])
                    report(f"[{number}/{len(rows)}] {row.image_text}: FAILED: {outcome.error} "
                           f"({countdown.text(number)})")  # fmt: skip
                    continue
                _append(results, [(*identity, *values) for values in nodule_rows])
                summary.nodules += len(nodule_rows)
                if outcome.status == "done":
                    summary.done += 1
                    report(f"[{number}/{len(rows)}] {row.image_text}: {len(nodule_rows)} nodules "
                           f"({outcome.seconds:.1f} s; {countdown.text(number)})")  # fmt: skip
                else:
                    summary.skipped += 1
                    report(f"[{number}/{len(rows)}] {row.image_text}: finished before, skipped "
                           f"({countdown.text(number)})")  # fmt: skip
    summary.seconds = time.perf_counter() - start
    return summary


def one_line(err: BaseException) -> str:
    """An error as one line a user can act on (the path and reason of an OSError, the message otherwise)."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename2 or err.filename
        text = f"{where}: {err.strerror}" if where else err.strerror
    elif isinstance(err, M3NetInputError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def model_for_workers(model: str) -> str:
    """What workers load: a bundled name as it is, else a file's full path (workers may start elsewhere).

    A name from ``m3net bundle --register`` becomes its registered, checksummed file.
    """
    from m3netcore.checkpoint import bundled_registry
    from m3netcore.user_models import user_model_path

    if model in bundled_registry():
        return model

    registered = user_model_path(model)
    return str((registered or Path(model)).resolve())


# --- private ---------------------------------------------------------------------------------

_MODELS: dict[tuple[str, str], tuple[object, str]] = {}  # per worker process: loaded once, kept


def _worker_model(options: BatchOptions):
    key = (options.model, options.device)
    if key not in _MODELS:
        from m3netcore.checkpoint import load_model
        from m3netcore.provenance import model_provenance

        if options.torch_threads:
            import torch

            torch.set_num_threads(options.torch_threads)
        model = load_model(options.model)
        described = model_provenance(model, options.model)
        _MODELS[key] = (model, described.get("sha256", described.get("weights_sha256", "")))
    return _MODELS[key]


def _predict_unless_finished(row: ManifestRow, options: BatchOptions) -> str:
    """``"skipped"`` or ``"done"``; waits for a folder another task still writes (a task left running by an
    interrupted run on a cluster, or a task Dask started twice), then looks again whether it is finished."""
    from m3netcore.outputs import OutputFolderBusy
    from m3netcore.predict_folder import predict_to_folder

    folder = options.out / CT_FOLDER / row.name
    model, model_sha256 = _worker_model(options)
    record = {"format": RECORD_FORMAT, "image": row.image_text, "series_uid": row.series_uid,
              "input_sha256": input_sha256(row), "model_sha256": model_sha256}  # fmt: skip
    waited_until = time.monotonic() + BUSY_WAIT_S
    while True:
        if _finished(folder, record):
            return "skipped"
        try:
            predict_to_folder(folder, row.image, model, points_file=row.points, series_uid=row.series_uid,
                              coords=options.coords, explain=options.explain, device=options.device,
                              model_source=options.model,
                              extra_files={DONE_RECORD: json.dumps(record, indent=2) + "\n"})  # fmt: skip
            return "done"
        except OutputFolderBusy:
            if time.monotonic() > waited_until:
                raise
            time.sleep(0.5)


def _finished(folder: Path, record: dict) -> bool:
    try:
        earlier = json.loads((folder / DONE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return earlier == record and (folder / RESULTS_CSV).is_file() and (folder / "results.json").is_file()


def _outcomes(rows: list[ManifestRow], options: BatchOptions, workers: int | None,
              scheduler: str | None) -> Iterable[RowOutcome]:  # fmt: skip
    """Each row's outcome as its task ends, from a local cluster of ``workers`` processes or ``scheduler``'s."""
    try:
        import distributed
    except ImportError as err:
        raise M3NetInputError("predict-many needs Dask: pip install 'm3net-core[batch]'") from err
    import logging

    with contextlib.ExitStack() as stack:
        if scheduler is None:
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.ERROR))  # fmt: skip
            client = stack.enter_context(distributed.Client(cluster))
        else:
            try:
                client = stack.enter_context(distributed.Client(scheduler, timeout="20s"))
            except (OSError, ValueError, TypeError) as err:
                raise M3NetInputError(f"cannot reach the Dask scheduler at {scheduler}: {one_line(err)}") from err
        run_id = uuid.uuid4().hex[:8]
        futures = {client.submit(predict_row, row, options, key=f"m3net-{row.name}-{run_id}", pure=False): row
                   for row in rows}  # fmt: skip
        try:
            for future in distributed.as_completed(futures):
                try:
                    yield future.result()
                except Exception as err:  # noqa: BLE001 - e.g. KilledWorker: the CT killed every worker it ran on
                    yield RowOutcome(futures[future].name, "failed", error=f"its worker died: {one_line(err)}")
                future.release()
        finally:
            client.cancel(list(futures))


def _print_warning(message: str) -> None:
    print(f"m3net: warning: {message}", file=sys.stderr)


def _folder_rows(folder: Path) -> list[list[str]]:
    with open(folder / RESULTS_CSV, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))[1:]


def _append(handle, rows: list) -> None:
    handle.write(_csv_text(rows))  # one write per CT, so Ctrl-C cannot split a CT's rows
    handle.flush()


def _csv_text(rows: Iterable) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _image_files(image: Path) -> list[Path]:
    """The files a CT is read from: every file of a folder (sorted), or the file and its detached data."""
    if image.is_dir():
        return sorted(p for p in image.rglob("*") if p.is_file())
    if not image.exists():
        raise M3NetInputError(f"no such file or folder: {image}")
    if image.suffix.lower() in (".mhd", ".nhdr"):  # the data file is named in the header, beside it by convention
        return [image, *sorted(p for p in image.parent.glob(f"{image.stem}.*") if p != image and p.is_file())]
    return [image]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


__all__ = [
    "BatchOptions",
    "BatchSummary",
    "ManifestRow",
    "RowOutcome",
    "ct_folder_name",
    "input_sha256",
    "one_line",
    "predict_row",
    "read_manifest",
    "run_batch",
]
