"""Read nodule points: Slicer markups JSON, a plain x,y,z CSV, or LUNA16 annotations.csv.

Every reader returns :class:`LabeledPoint` in LPS millimetres, the core's convention.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from m3netcore.errors import M3NetInputError
from m3netcore.geometry import to_lps

if TYPE_CHECKING:
    import SimpleITK as sitk

LUNA16_COLUMNS = ("seriesuid", "coordx", "coordy", "coordz")
LUNA25_COLUMNS = ("seriesinstanceuid", "coordx", "coordy", "coordz")


@dataclass(frozen=True)
class LabeledPoint:
    """A nodule point: a label for the results and its LPS position in mm."""

    label: str
    lps: tuple[float, float, float]


def parse_point(text: str) -> tuple[float, float, float]:
    """``"X,Y,Z"`` -> a float triple (the CLI's ``--point``).

    Exactly three finite numbers separated by commas, spaces around them allowed; an empty
    field (``1,,2,3``) or a fourth number is an error, never silently dropped.
    """
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(parts):
        raise M3NetInputError(f"--point must be three numbers X,Y,Z in mm, got {text!r}")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError as err:
        raise M3NetInputError(f"--point must be three numbers X,Y,Z in mm, got {text!r}") from err
    if not all(math.isfinite(v) for v in values):
        raise M3NetInputError(f"--point must be finite numbers, got {text!r}")
    return values


def points_for_image(
    path: str | os.PathLike, image: sitk.Image, image_path: str | os.PathLike | None = None, *, coords: str = "LPS"
) -> list[LabeledPoint]:
    """The points of a points file that belong to ``image``, in LPS (what ``m3net predict --points`` reads).

    LUNA16 ``annotations.csv`` and LUNA25 files list the nodules of many series, one row
    each: only the rows of this image's SeriesInstanceUID are kept. The UID comes from the
    DICOM header of an image read from a DICOM folder, or from a file named
    ``<SeriesInstanceUID>.mhd`` / ``.mha`` (as LUNA16 and LUNA25 name their scans), which is
    why ``image_path`` is asked for. Markups and plain CSV files are read whole.

    Args:
        path: the points file (see :func:`read_points`).
        image: the CT the points are for (from :func:`m3netcore.read_image`).
        image_path: the file or folder ``image`` was read from.
        coords: the coordinate system of a plain CSV ("LPS" or "RAS").

    Raises:
        M3NetInputError: as :func:`read_points`; a LUNA file with several series for an image
            whose UID is unknown, or without a row for its series.
    """
    from m3netcore.io import series_uid_of

    return read_points(path, coords=coords, series_uid=series_uid_of(image, image_path))


def unique_labels(labels: Iterable[str]) -> list[str]:
    """Labels made unique by a ``-2``, ``-3``... suffix on repeats (file names and tables need one per point)."""
    taken: set[str] = set()
    unique = []
    for label in labels:
        candidate, count = label, 1
        while candidate in taken:
            count += 1
            candidate = f"{label}-{count}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def read_points(
    path: str | os.PathLike, *, coords: str = "LPS", series_uid: str | None = None
) -> list[LabeledPoint]:
    """Read points from a file, in LPS.

    Args:
        path: a Slicer markups file (``.mrk.json``, its own coordinate system is honoured),
            a CSV with columns ``x,y,z`` (and optionally ``label``) in ``coords``, or a
            LUNA16 ``annotations.csv`` (``seriesuid,coordX,coordY,coordZ[,diameter_mm]``,
            world coordinates, which are LPS).
        coords: the coordinate system of a plain CSV ("LPS" or "RAS").
        series_uid: for LUNA16 files, keep only this series' rows.

    Raises:
        M3NetInputError: missing, empty or malformed file; no row for the series.
    """
    path = Path(path)
    if not path.is_file():
        raise M3NetInputError(f"no such points file: {path}")
    if path.name.lower().endswith(".json"):
        points = _read_markups(path)
    else:
        points = _read_csv(path, coords, series_uid)
    if not points:
        raise M3NetInputError(f"{path} contains no points")
    return points


def _read_markups(path: Path) -> list[LabeledPoint]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise M3NetInputError(f"{path} is not valid JSON: {err}") from err
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise M3NetInputError(f"{path} is not a Slicer markups file (no 'markups' list)")
    points = []
    for markup in markups:
        if not isinstance(markup, dict):
            raise M3NetInputError(f"{path}: each entry of 'markups' must be an object")
        # Slicer always writes the field; guessing it would flip x and y silently.
        if "coordinateSystem" not in markup:
            raise M3NetInputError(f"{path}: markup has no 'coordinateSystem' (LPS or RAS); add it")
        system = str(markup["coordinateSystem"]).upper()
        for n, control_point in enumerate(markup.get("controlPoints") or [], start=1):
            if not isinstance(control_point, dict):
                raise M3NetInputError(f"{path}: control point {n} is not an object")
            if control_point.get("positionStatus", "defined") != "defined":
                continue
            position = control_point.get("position")
            if not isinstance(position, list) or len(position) != 3:
                raise M3NetInputError(f"{path}: control point {n} has no 3D position")
            label = str(control_point.get("label") or f"P-{n}")
            points.append(LabeledPoint(label, tuple(to_lps([position], system)[0])))
    return points


def _read_csv(path: Path, coords: str, series_uid: str | None) -> list[LabeledPoint]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        raise M3NetInputError(f"{path} is not a readable CSV file: {err}") from err
    if not rows:
        raise M3NetInputError(f"{path} has no data rows (a header with x,y,z and one row per point)")
    columns = {name.strip().lower(): name for name in rows[0] if name}
    if all(c in columns for c in LUNA25_COLUMNS) and "seriesuid" not in columns:
        columns["seriesuid"] = columns["seriesinstanceuid"]
    if all(c in columns for c in LUNA16_COLUMNS):
        return _luna16_points(path, rows, columns, series_uid)
    if not all(c in columns for c in ("x", "y", "z")):
        raise M3NetInputError(
            f"{path}: expected columns x,y,z (plain CSV) or seriesuid,coordX,coordY,coordZ (LUNA16; "
            "SeriesInstanceUID for LUNA25), "
            f"found {', '.join(columns) or 'none'}"
        )
    triples, labels = [], []
    for n, row in enumerate(rows, start=1):
        triples.append(_row_triple(path, n, row, [columns[c] for c in ("x", "y", "z")]))
        label = (row.get(columns["label"]) or "") if "label" in columns else ""
        labels.append(label.strip() or f"P-{n}")
    return [LabeledPoint(label, tuple(p)) for label, p in zip(labels, to_lps(triples, coords), strict=True)]


def _luna16_points(path: Path, rows: list[dict], columns: dict, series_uid: str | None) -> list[LabeledPoint]:
    uids = {(row[columns["seriesuid"]] or "").strip() for row in rows}
    if series_uid is not None:
        rows = [row for row in rows if (row[columns["seriesuid"]] or "").strip() == series_uid]
        if not rows:
            raise M3NetInputError(f"{path} has no annotation for series {series_uid} ({len(uids)} series in file)")
    elif len(uids) > 1:
        raise M3NetInputError(
            f"{path} annotates {len(uids)} series and the image's SeriesInstanceUID is unknown; "
            "name the image <seriesuid>.mhd (as LUNA16 does) or read a DICOM folder"
        )
    names = [columns[c] for c in ("coordx", "coordy", "coordz")]
    triples = [_row_triple(path, n, row, names) for n, row in enumerate(rows, start=1)]
    return [LabeledPoint(f"N-{n}", tuple(p)) for n, p in enumerate(to_lps(triples, "LPS"), start=1)]


def _row_triple(path: Path, n: int, row: dict, names: list[str]) -> tuple[float, float, float]:
    try:
        return tuple(float(row[name]) for name in names)
    except (TypeError, ValueError) as err:
        values = [row.get(name) for name in names]
        raise M3NetInputError(f"{path}: row {n} has non-numeric coordinates {values}") from err
