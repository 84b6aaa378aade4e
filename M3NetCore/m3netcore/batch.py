"""``m3net predict-many``: every CT of a manifest, resumable, on local processes or a Dask cluster.

A manifest is a CSV file with one row per CT::

    image,points,series_uid
    scans/ct-001.nrrd,points/ct-001.mrk.json,
    dicom/patient-7,annotations.csv,1.2.840.113654.2.55.19

``image`` is an image file, a DICOM series folder or a study on a DICOMweb service
(``https://pacs.example.org/dicom-web/studies/<StudyInstanceUID>``, optionally followed by
``/series/<SeriesInstanceUID>``; credentials as for ``m3net predict --dicomweb``, in every
worker's environment), ``points`` any points file ``m3net predict --points`` reads (a
LUNA16/LUNA25 file of many series is matched to each image), ``series_uid`` optional;
relative paths are relative to the manifest's folder.

The output folder holds ``cts/<name>/`` per CT (exactly what ``m3net predict`` writes,
plus ``batch.json``, the completion record), ``results.csv`` (one row per nodule, the
CT's name, image and series first) and ``failures.csv`` (one row per CT that failed, with
a one-line reason). Why it can be stopped and rerun at any moment:

- each CT folder is an :class:`m3netcore.outputs.OutputFolder`: its set of files appears
  whole or not at all, so a worker killed mid-CT (or a Ctrl-C) leaves it as it was, and the
  CT is simply predicted again (Dask reruns the task of a dead worker);
- ``batch.json`` is written last into that set and holds the SHA-256 of the CT's files and
  points file and of the model, so a rerun skips a CT whose record matches (a DICOMweb
  series is not downloaded again to be checked: one search gives its series UID and
  image count, which stand for it with the service and study UID);
- ``results.csv`` and ``failures.csv`` are written only by the coordinating process, one
  CT at a time as its task ends, from the CT folder's committed results.csv; each CT is
  appended once per run, so a task that ran twice never gives duplicate rows.

Workers are Dask (``distributed``) worker processes: a ``LocalCluster`` of one process per
CPU core by default (per GPU on a GPU machine), or those of an existing scheduler
(``--scheduler tcp://host:8786``, e.g. started by dask-jobqueue on SLURM). Each worker
loads the model once and keeps it, and runs 1 + ``read_ahead`` task threads: while one
CT's nodules are in the network, the next CTs are read and cropped, and the network runs
the nodules of every CT waiting in one forward pass (:mod:`m3netcore.batching`).
Dask rather than ``concurrent.futures`` because a process pool breaks as a whole when one
process is killed, while Dask's nanny restarts the worker and reschedules only its task,
and the same code then runs across machines.
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
import threading
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
SCHEDULER_TIMEOUT = "20s"  # how long to try reaching a --scheduler before saying it cannot be reached


@dataclass(frozen=True)
class ManifestRow:
    """One CT of a manifest: its folder name, image (a path, or a DICOMweb service and study), points and series."""

    name: str
    image_text: str  # as the manifest says it, for the tables
    image: Path | None  # absolute; None for a DICOMweb study
    points: Path
    series_uid: str | None
    dicomweb: str | None = None  # the service's URL (its WADO-RS root)
    study_uid: str | None = None


@dataclass(frozen=True)
class BatchOptions:
    """What every worker needs to predict a row: where to write and with which model."""

    out: Path
    model: str
    device: str = "auto"
    coords: str = "LPS"
    explain: bool = True
    torch_threads: int | None = None
    spread_over_gpus: bool = False  # a local cluster: worker N uses GPU N modulo the GPUs there are


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
        service, study, series = _dicomweb_study(cells["image"], series, f"manifest {path} line {number}")
        key = (cells["image"], series)
        if key in seen:
            raise M3NetInputError(f"manifest {path} line {number}: the same CT as line {seen[key]} ({cells['image']})")
        seen[key] = number
        rows.append(ManifestRow(name=ct_folder_name(cells["image"], series), image_text=cells["image"],
                                image=None if service else base / cells["image"], points=base / cells["points"],
                                series_uid=series, dicomweb=service, study_uid=study))  # fmt: skip
    if not rows:
        raise M3NetInputError(f"manifest {path} has no rows (one row per CT under the header image,points)")
    return rows


def ct_folder_name(image_text: str, series_uid: str | None) -> str:
    """A CT's folder name: its image path made safe, plus a hash that keeps every CT's folder its own."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", image_text).strip("._")[-NAME_CHARACTERS:].strip("._") or "ct"
    digest = hashlib.sha256(f"{image_text}\0{series_uid or ''}".encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def input_sha256(row: ManifestRow, dicomweb_series: tuple[str, int] | None = None) -> str:
    """SHA-256 over the CT's files (a DICOM folder's every file), its points file and its series UID.

    A DICOMweb study is not downloaded for this: it stands for itself by its service, study
    UID, the series used and that series' instance count (``dicomweb_series``, from
    :func:`m3netcore.dicomweb.find_ct_series`), so an image added to the series on the server
    makes the CT run again.
    """
    return input_digests(row, dicomweb_series)[0]


def input_digests(row: ManifestRow, dicomweb_series: tuple[str, int] | None = None) -> tuple[str, dict[str, str]]:
    """:func:`input_sha256` and the SHA-256 of each file behind it, by absolute path (read once per CT)."""
    from m3netcore.checkpoint import file_sha256

    files: dict[str, str] = {}
    digest = hashlib.sha256(f"series {row.series_uid or ''}\n".encode())
    if row.dicomweb:
        if dicomweb_series is None:
            raise ValueError(f"{row.image_text}: a DICOMweb row needs the series it stands for (find_ct_series)")
        series, instances = dicomweb_series
        digest.update(f"dicomweb {row.dicomweb} study {row.study_uid} series {series} {instances}\n".encode())
    else:
        for path in _image_files(row.image):
            name = path.relative_to(row.image).as_posix() if row.image.is_dir() else path.name
            files[os.path.abspath(path)] = file_sha256(path)
            digest.update(f"image {name} {files[os.path.abspath(path)]}\n".encode())
    digest.update(f"points {file_sha256(row.points)}\n".encode())
    return digest.hexdigest(), files


def predict_row(row: ManifestRow, options: BatchOptions) -> RowOutcome:
    """Predict one CT into its folder in ``options.out`` unless it is finished already (a worker's task).

    Errors of the CT (unreadable, no points, a point outside) come back as a ``"failed"``
    outcome with one line; only the death of the process makes Dask run it again.
    """
    start = time.perf_counter()
    _capture_warnings_per_thread()
    _TOLD.messages = caught = []  # told by the coordinator, with the CT's name
    try:
        status, error = _predict_unless_finished(row, options), ""
    except Exception as err:  # noqa: BLE001 - any error of one CT is that CT's failure; the batch goes on
        status, error = "failed", one_line(err)
    finally:
        _TOLD.messages = None
    told = tuple(dict.fromkeys(" ".join(message.split()) for message in caught))
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
    read_ahead: int = 1,
    report: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Predict every CT of ``manifest`` into ``out``; see the module's docstring for the layout.

    Args:
        manifest: the manifest CSV.
        out: the output folder (locked for the run).
        model: a bundled model name or a model file, loaded once per worker.
        device, coords, explain: as for ``m3net predict``.
        workers: local worker processes (default: one per CPU core this process may use; on a
            GPU machine, one per GPU).
        scheduler: address of an existing Dask scheduler instead of local workers (their
            threads are the cluster's: ``dask worker --nthreads 2`` gives each one read-ahead).
        read_ahead: CTs each local worker reads while its network runs (threads beyond the first).
        report: called with one progress line per CT.
        warn: called with each warning a CT gave (default: printed to stderr).

    Raises:
        M3NetInputError: a bad manifest, model, device or worker count; an unreachable scheduler.
    """
    from m3netcore.checkpoint import load_model
    from m3netcore.outputs import run_folder_lock
    from m3netcore.predict import resolve_device

    if workers is not None and scheduler is not None:
        raise M3NetInputError("give --workers (local processes) or --scheduler (a Dask cluster), not both")
    if workers is not None and workers < 1:
        raise M3NetInputError(f"--workers must be at least 1, got {workers}")
    if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 0:
        raise M3NetInputError(f"--read-ahead must be a whole number of at least 0, got {read_ahead!r}")
    rows = read_manifest(manifest)
    model = model_for_workers(model)
    load_model(model)  # a bad model is one error now, not one failure per CT
    local_cpus, gpus = _usable_cpus(), 0
    if scheduler is None:
        target = resolve_device(device)
        if target.type == "cuda":  # one worker per GPU it may use: "cuda" all of them, "cuda:N" that one
            import torch

            gpus = torch.cuda.device_count() if target.index is None else 1
    if scheduler is None and workers is None:
        workers = gpus or local_cpus
    options = BatchOptions(out=Path(out).resolve(), model=model, device=device, coords=coords, explain=explain,
                           torch_threads=max(1, local_cpus // workers) if workers else None,
                           spread_over_gpus=gpus > 1)  # fmt: skip
    summary = BatchSummary()
    start = time.perf_counter()
    with run_folder_lock(out), _Workers(workers, 1 + read_ahead, scheduler) as client:
        _collect(rows, options, client, summary, report, warn or _print_warning)
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

# per worker process: each model loaded once and kept, with its one network thread (a model with
# heatmaps and one without are two models: Grad-CAM's hooks must not meet a plain forward pass)
_MODELS: dict[tuple[str, str, bool], tuple[object, str, dict]] = {}
_BATCHERS: dict[tuple[str, str, bool], object] = {}
_LOADING = threading.Lock()
_TOLD = threading.local()  # the warnings of the CT this task thread predicts
_CAPTURING = []  # [True] once this process sends warnings to _TOLD


def _capture_warnings_per_thread() -> None:
    """Route this process's warnings to the list of the task thread that gave them.

    ``warnings.catch_warnings`` swaps process-wide state, so with two task threads a
    warning of one CT would be told as the other's; a thread-local list keeps them apart.
    """
    with _LOADING:
        if _CAPTURING:
            return
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            messages = getattr(_TOLD, "messages", None)
            if messages is None:
                return original(message, category, filename, lineno, file, line)
            messages.append(str(message))

        warnings.showwarning = show
        warnings.simplefilter("always")  # every CT's warning, not the first of each place only
        _CAPTURING.append(True)


def _collect(rows: list[ManifestRow], options: BatchOptions, client, summary: BatchSummary,
             report: Callable[[str], None], warn: Callable[[str], None]) -> None:  # fmt: skip
    """Submit every row to ``client``'s workers and write the combined tables as the CTs end."""
    from m3netcore.atomic import write_text_atomic
    from m3netcore.results import CSV_COLUMNS

    out = options.out
    results_path, failures_path = out / RESULTS_CSV, out / FAILURES_CSV
    # rewritten only now that the workers are there: a run that cannot start leaves the last tables
    write_text_atomic(results_path, _csv_text([(*IDENTITY_COLUMNS, *CSV_COLUMNS)]))
    write_text_atomic(failures_path, _csv_text([FAILURE_COLUMNS]))
    by_name = {row.name: row for row in rows}
    with open(results_path, "a", encoding="utf-8", newline="") as results, \
            open(failures_path, "a", encoding="utf-8", newline="") as failures, \
            contextlib.closing(_outcomes(client, rows, options)) as ends:  # fmt: skip
        countdown = Countdown(len(rows))
        for number, outcome in enumerate(ends, start=1):
            row = by_name[outcome.name]
            identity = (row.name, row.image_text, row.series_uid or "")
            for message in outcome.warnings:
                warn(message if row.image is not None and str(row.image) in message else f"{row.image_text}: {message}")
            nodule_rows = []
            if outcome.status != "failed":
                try:
                    nodule_rows = _folder_rows(out / CT_FOLDER / row.name)
                except OSError as err:  # removed by hand since: a failure of this CT, not of the batch
                    outcome = RowOutcome(row.name, "failed", error=one_line(err))
            where = f"[{number}/{len(rows)}] {row.image_text}"
            if outcome.status == "failed":
                summary.failed += 1
                _append(failures, [(*identity, outcome.error)])
                report(f"{where}: FAILED: {outcome.error} ({countdown.text(number)})")
                continue
            _append(results, [(*identity, *values) for values in nodule_rows])
            summary.nodules += len(nodule_rows)
            if outcome.status == "done":
                summary.done += 1
                report(f"{where}: {len(nodule_rows)} nodules ({outcome.seconds:.1f} s; {countdown.text(number)})")
            else:
                summary.skipped += 1
                report(f"{where}: finished before, skipped ({countdown.text(number)})")


def _worker_model(options: BatchOptions):
    """``(model, its SHA-256, {its file: SHA-256})`` of this worker process, loaded on first use."""
    key = (options.model, options.device, options.explain)
    with _LOADING:
        if key not in _MODELS:
            from m3netcore.checkpoint import load_model
            from m3netcore.provenance import model_provenance

            if options.torch_threads:
                import torch

                torch.set_num_threads(options.torch_threads)
            model = load_model(options.model)
            described = model_provenance(model, options.model)
            sha256 = described.get("sha256", described.get("weights_sha256", ""))
            files = {os.path.abspath(options.model): sha256} if Path(options.model).is_file() else {}
            _MODELS[key] = (model, sha256, files)
    return _MODELS[key]


def _worker_batcher(options: BatchOptions, model):
    """This worker process's network thread for ``options``' model, device and heatmaps."""
    from m3netcore.batching import NoduleBatcher

    key = (options.model, options.device, options.explain)
    with _LOADING:
        if key not in _BATCHERS:
            _BATCHERS[key] = NoduleBatcher(model, device=_worker_device(options), explain=options.explain)
    return _BATCHERS[key]


def _worker_device(options: BatchOptions) -> str:
    """The device of this worker: on a local cluster of several GPUs, the one its number picks."""
    if not options.spread_over_gpus:
        return options.device
    import distributed
    import torch

    name = distributed.get_worker().name
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else options.device


def _predict_unless_finished(row: ManifestRow, options: BatchOptions) -> str:
    """``"skipped"`` or ``"done"``; waits for a folder another task still writes (a task left running by an
    interrupted run on a cluster, or a task Dask started twice), then looks again whether it is finished."""
    import tempfile

    from m3netcore.outputs import OutputFolderBusy

    folder = options.out / CT_FOLDER / row.name
    model, model_sha256, model_files = _worker_model(options)
    batcher = _worker_batcher(options, model)
    client = found = None
    if row.dicomweb:
        from m3netcore.dicomweb import connect, find_ct_series

        client = connect(row.dicomweb)
        found = find_ct_series(client, row.study_uid, row.series_uid)
    digest, files = input_digests(row, found)
    record = {"format": RECORD_FORMAT, "image": row.image_text, "series_uid": row.series_uid,
              "input_sha256": digest, "model_sha256": model_sha256}  # fmt: skip
    if _finished(folder, record):
        return "skipped"
    with contextlib.ExitStack() as stack:
        image, series = row.image, row.series_uid
        if row.dicomweb:  # downloaded once, whatever the waiting below
            from m3netcore.dicomweb import download_ct_series

            image = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m3net-dicomweb-")))
            series = found[0]  # found above: no second search
            download_ct_series(client, row.study_uid, series, image)
        waited_until = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                _predict_into(folder, image, series, row, options, model, batcher, record, files | model_files)
                return "done"
            except OutputFolderBusy:
                if time.monotonic() > waited_until:
                    raise
                time.sleep(0.5)
            if _finished(folder, record):
                return "skipped"


def _predict_into(folder: Path, image: Path, series: str | None, row: ManifestRow, options: BatchOptions, model,
                  batcher, record: dict, known_sha256: dict[str, str]) -> None:  # fmt: skip
    from m3netcore.predict_folder import predict_to_folder

    predict_to_folder(folder, image, model, points_file=row.points, series_uid=series, coords=options.coords,
                      explain=options.explain, model_source=options.model, batcher=batcher, dicomweb=row.dicomweb,
                      known_sha256=known_sha256,
                      extra_files={DONE_RECORD: json.dumps(record, indent=2) + "\n"})  # fmt: skip


def _finished(folder: Path, record: dict) -> bool:
    try:
        earlier = json.loads((folder / DONE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return earlier == record and (folder / RESULTS_CSV).is_file() and (folder / "results.json").is_file()


class _Workers:
    """The Dask client of a run: a LocalCluster of ``workers`` processes, or ``scheduler``'s workers."""

    def __init__(self, workers: int | None, threads: int, scheduler: str | None) -> None:
        self.workers, self.threads, self.scheduler = workers, threads, scheduler
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        try:
            import distributed
        except ImportError as err:
            raise M3NetInputError("predict-many needs Dask: pip install 'm3net-core[batch]'") from err
        import logging

        with self._stack as stack:
            if self.scheduler is None:
                cluster = stack.enter_context(distributed.LocalCluster(
                    n_workers=self.workers, threads_per_worker=self.threads, processes=True, host="127.0.0.1",
                    dashboard_address=None, silence_logs=logging.ERROR))  # fmt: skip
                client = stack.enter_context(distributed.Client(cluster))
            else:
                try:
                    client = stack.enter_context(distributed.Client(self.scheduler, timeout=SCHEDULER_TIMEOUT))
                except (OSError, ValueError, TypeError) as err:
                    raise M3NetInputError(f"cannot reach the Dask scheduler at {self.scheduler}: "
                                          f"{one_line(err)}") from err  # fmt: skip
            self._stack = stack.pop_all()
        return client

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _outcomes(client, rows: list[ManifestRow], options: BatchOptions) -> Iterable[RowOutcome]:
    """Each row's outcome as its task ends on ``client``'s workers."""
    import distributed

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
    """The files a CT is read from: every file of a folder (sorted), or the file and the data file its header names."""
    from m3netcore.provenance import detached_data_file

    if image.is_dir():
        return sorted(p for p in image.rglob("*") if p.is_file())
    if not image.exists():
        raise M3NetInputError(f"no such file or folder: {image}")
    data = detached_data_file(image)
    if data is not None:
        return [image, data]
    if image.suffix.lower() in (".mhd", ".nhdr"):  # a header whose data it does not name plainly (LIST, %d):
        return [image, *sorted(p for p in image.parent.glob(f"{image.stem}.*") if p != image and p.is_file())]
    return [image]


_DICOMWEB_STUDY = re.compile(r"^(?P<service>https?://.+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")


def _dicomweb_study(cell: str, series: str | None, where: str) -> tuple[str | None, str | None, str | None]:
    """``(service URL, study UID, series UID)`` of an ``image`` cell naming a DICOMweb study, else ``(None, None,
    series)``."""
    if not re.match(r"^https?://", cell, flags=re.IGNORECASE):
        return None, None, series
    match = _DICOMWEB_STUDY.match(cell)
    if match is None:
        raise M3NetInputError(f"{where}: {cell} is not a DICOMweb study (expected <service>/studies/<StudyUID>, "
                              "optionally followed by /series/<SeriesUID>)")  # fmt: skip
    in_url = match.group("series")
    if in_url and series and in_url != series:
        raise M3NetInputError(f"{where}: the URL names series {in_url} but series_uid is {series}")
    return match.group("service"), match.group("study"), in_url or series


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
    "input_digests",
    "input_sha256",
    "one_line",
    "predict_row",
    "read_manifest",
    "run_batch",
]
