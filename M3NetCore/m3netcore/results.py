"""Write prediction results: results.json, results.csv and one NRRD per heatmap.

results.json carries the run's provenance (:mod:`m3netcore.provenance`) under
``"provenance"``; results.csv repeats its identifying fields (DICOM UIDs or the file's
checksum, the model's checksum, version, device, time) on every row, so a row copied
into a spreadsheet still says which scan and which model it came from.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

from m3netcore.atomic import atomic_path
from m3netcore.predict import NoduleResult
from m3netcore.provenance import CSV_FIELDS, csv_values

CSV_COLUMNS = (
    "label",
    "x_lps",
    "y_lps",
    "z_lps",
    "probability",
    "prediction",
    "attention_micro",
    "attention_meso",
    "attention_macro",
    "model",
    "model_version",
    *CSV_FIELDS,
)


# gzip level of the NRRD files: heatmaps are float noise that level 9 shrinks little more (204 against
# 230 KiB for a 64^3 heatmap) at 4 ms against 3 ms a file (benchmarks/batch.py writes thousands)
COMPRESSION_LEVEL = 1
LABEL_IN_FILENAME = 60  # characters of a label kept in heatmap file names (the label itself is kept whole)


def heatmap_filename(number: int, label: str, scale: str) -> str:
    """``<NN>_<label>_heatmap_<scale>.nrrd``: the number keeps names unique, the label readable.

    The label is cut to :data:`LABEL_IN_FILENAME` characters so that any label makes a
    valid file name (a name has at most 255 bytes); results.json and results.csv keep it whole.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:LABEL_IN_FILENAME].strip("._") or "nodule"
    return f"{number:02d}_{safe}_heatmap_{scale}.nrrd"


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """``sitk.WriteImage`` (compressed) into ``path`` atomically; a failed write is an ``OSError`` naming ``path``.

    SimpleITK reports a full disk or a file-size limit as a ``RuntimeError`` of many lines
    without an errno; this says what happened in one line and leaves no partial file.
    """
    with atomic_path(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=True, compressionLevel=COMPRESSION_LEVEL)
        except RuntimeError as err:
            raise _write_failure(Path(path)) from err


class ResultsWriter:
    """Write one ``predict`` call's outputs into a folder as the results come, keeping none of them.

    Each :meth:`add` writes that nodule's heatmaps at once and appends its rows to
    results.json and results.csv, which are built in hidden partial files and put in place
    by :meth:`close` (so a folder never shows a half-written table). Memory does not grow
    with the number of results. Use as a context manager; on an error the partial tables
    are removed (heatmaps already written stay: write into an
    :class:`m3netcore.outputs.OutputFolder` staging folder for all-or-nothing).

    Args:
        out_dir: the folder (created if needed).
        source: what the run was given (e.g. the image path and model name), for results.json.
        provenance: the record of :func:`m3netcore.provenance.provenance`, written to
            results.json and, flattened, on every CSV row.
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, source: dict | None = None, provenance: dict | None = None
    ) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.heatmaps = 0
        self._provenance_row = list(csv_values(provenance or {}).values())
        header = _header(source, provenance) | {"nodules": _NODULES}
        self._json_head, self._json_tail = json.dumps(header, indent=2).split(json.dumps(_NODULES))
        self._json = _PartialFile(self.out / "results.json")
        self._csv = _PartialFile(self.out / "results.csv")
        self._json.write(self._json_head + "[")
        self._csv_writer = csv.writer(self._csv.handle, lineterminator="\n")
        self._csv_writer.writerow(CSV_COLUMNS)

    def add(self, label: str, result: NoduleResult) -> dict:
        """Write one result's heatmaps and table rows; returns its results.json entry."""
        self.count += 1
        entry = {"label": label} | result.to_dict()
        files = {}
        for scale, image in result.heatmaps.items():
            name = heatmap_filename(self.count, label, scale)
            write_image(image, self.out / name)
            files[scale] = name
            self.heatmaps += 1
        entry["heatmap_files"] = files
        text = json.dumps(entry, indent=2).replace("\n", "\n    ")
        self._json.write(("," if self.count > 1 else "") + "\n    " + text)
        try:
            self._csv_writer.writerow(_csv_row(label, result) + self._provenance_row)
        except OSError as err:
            raise _write_failure(self._csv.final, err) from err
        return entry

    def close(self) -> None:
        """Finish results.json and results.csv and move them into place."""
        self._json.write(("\n  ]" if self.count else "]") + self._json_tail + "\n")
        self._csv.commit()
        self._json.commit()

    def abort(self) -> None:
        """Remove the partial tables."""
        self._json.abort()
        self._csv.abort()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort()


def write_results(
    results: Sequence[NoduleResult],
    labels: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    source: dict | None = None,
    provenance: dict | None = None,
) -> dict:
    """Write all outputs of one ``predict`` call into ``out_dir``; returns the JSON document.

    Args:
        results: from :func:`m3netcore.predict`.
        labels: one name per result (point labels), used in the tables and file names.
        out_dir: created if needed; files are written atomically.
        source: what the run was given (e.g. the image path), for results.json.
        provenance: from :func:`m3netcore.provenance.provenance` (see :class:`ResultsWriter`).
    """
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    with ResultsWriter(out_dir, source=source, provenance=provenance) as writer:
        nodules = [writer.add(label, result) for label, result in zip(labels, results, strict=True)]
    return _header(source, provenance) | {"nodules": nodules}


def results_csv(results: Sequence[NoduleResult], labels: Sequence[str], provenance: dict | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    extra = list(csv_values(provenance or {}).values())
    for label, result in zip(labels, results, strict=True):
        writer.writerow(_csv_row(label, result) + extra)
    return buffer.getvalue()


_NODULES = "@nodules@"  # stands in for the list in the header, which is then written one entry at a time


def _header(source: dict | None, provenance: dict | None) -> dict:
    header = {"coordinate_system": "LPS", "units": "mm", "source": source or {}}
    if provenance is not None:
        header["provenance"] = provenance
    return header


def _csv_row(label: str, result: NoduleResult) -> list:
    attention = result.scale_attention or {}
    return [
        label,
        *(f"{v:.3f}" for v in result.point_lps),
        f"{result.probability:.4f}",
        result.label,
        *(_optional(attention.get(scale)) for scale in ("micro", "meso", "macro")),
        result.model.get("name", ""),
        result.model.get("version", ""),
    ]


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


class _PartialFile:
    """A text file written under a hidden name beside ``final`` and moved there by :meth:`commit`."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self._context = atomic_path(final)
        self.temporary = self._context.__enter__()
        self.handle = open(self.temporary, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed in commit/abort

    def write(self, text: str) -> None:
        try:
            self.handle.write(text)
        except OSError as err:
            raise _write_failure(self.final, err) from err

    def commit(self) -> None:
        try:
            self.handle.close()
        except OSError as err:
            self.abort()
            raise _write_failure(self.final, err) from err
        self._context.__exit__(None, None, None)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(Exception):
            self._context.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _write_failure(path: Path, err: OSError | None = None) -> OSError:
    """An OSError naming ``path`` that says why a write failed, in the words the system would use."""
    if err is not None and err.errno is not None:
        return type(err)(err.errno, err.strerror, str(path))
    folder = path.parent
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except OSError:
        pass
    if not os.access(folder, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return OSError(errno.EIO, "could not be written (disk full, file size limit or input/output error)", str(path))
