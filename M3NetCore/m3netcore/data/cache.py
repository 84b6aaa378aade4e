"""The training cache: per nodule a multi-scale pyramid of HU cubes, plus the manifest.

One format for real LIDC images (``m3net lidc prepare``) and LIDC-phantom
(``m3net lidc phantom``)::

    CACHE/
      cache.json           format, kind, whether semi-synthetic, pyramid spec, counts
      manifest.csv         the nodule table (labels per protocol, folds) + LPS centre, index
      pyramid_micro.npy    int16 HU, (N, S, S, S) [z, y, x], one cube per nodule
      pyramid_meso.npy
      pyramid_macro.npy

Each cube is centred on the nodule, axis-aligned in LPS, at its view's voxel size, and
``margin`` times the view's field of view, so training can rotate, flip, scale and shift
the view without reading the CT again. A cache is built in a hidden folder beside its
destination and renamed into place only when complete: there is never a half cache.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m3netcore.atomic import write_text_atomic
from m3netcore.crops import Preprocessing, ScaleSpec, default_preprocessing, sample_scale
from m3netcore.data.manifest import read_rows_csv, rows_to_csv
from m3netcore.errors import M3NetInputError

FORMAT_NAME = "m3net-cache"
FORMAT_VERSION = 1
DEFAULT_MARGIN = 1.5  # a cube 1.5 x the view covers rotations up to ~35 degrees about any axis
CENTRE_COLUMNS = ("centre_x_lps", "centre_y_lps", "centre_z_lps")


def pyramid_specs(preprocessing: Preprocessing, margin: float = DEFAULT_MARGIN) -> tuple[ScaleSpec, ...]:
    """The stored cube of each view: its voxel size, ``margin`` times its field of view (even grid)."""
    specs = []
    for scale in preprocessing.scales:
        grid = tuple(2 * math.ceil(n * margin / 2) for n in scale.grid)
        fov = tuple(g * s for g, s in zip(grid, scale.spacing_mm, strict=True))
        specs.append(ScaleSpec(scale.name, fov, grid, scale.antialias))
    return tuple(specs)


@dataclass
class Cache:
    """An opened cache: its description, manifest rows and memory-mapped pyramids."""

    path: Path
    info: dict
    rows: list[dict]
    pyramids: dict[str, np.ndarray]

    @property
    def semi_synthetic(self) -> bool:
        return bool(self.info.get("semi_synthetic"))

    def __len__(self) -> int:
        return len(self.rows)


class CacheWriter:
    """Builds a cache of ``count`` nodules in a hidden folder; :meth:`commit` moves it into place.

    Use as a context manager: leaving the block by an exception removes the partial folder.
    """

    def __init__(
        self,
        destination: str | os.PathLike,
        count: int,
        *,
        kind: str,
        semi_synthetic: bool,
        description: str,
        preprocessing: Preprocessing | None = None,
        margin: float = DEFAULT_MARGIN,
        extra: dict | None = None,
    ) -> None:
        self.destination = Path(destination)
        if self.destination.exists():
            raise M3NetInputError(f"{self.destination} already exists; remove it or choose another --out")
        if count < 1:
            raise M3NetInputError("a cache needs at least one nodule")
        self.preprocessing = preprocessing or default_preprocessing()
        self.specs = pyramid_specs(self.preprocessing, margin)
        self.count = count
        self.rows: list[dict | None] = [None] * count
        self.info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "semi_synthetic": semi_synthetic,
            "description": description,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "margin": margin,
            "outside_hu": self.preprocessing.outside_hu,
            "pyramid": [
                {"name": s.name, "field_of_view_mm": list(s.field_of_view_mm), "grid": list(s.grid),
                 "spacing_mm": list(s.spacing_mm)}
                for s in self.specs
            ],
            "count": count,
        } | (extra or {})
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self.work = self.destination.with_name(f".{self.destination.name}.partial-{secrets.token_hex(4)}")
        self.work.mkdir()
        try:
            self.pyramids = {
                s.name: np.lib.format.open_memmap(
                    self.work / f"pyramid_{s.name}.npy", mode="w+", dtype=np.int16, shape=(count, *s.tensor_shape)
                )
                for s in self.specs
            }
        except OSError as err:  # e.g. no room: leave nothing behind
            shutil.rmtree(self.work, ignore_errors=True)
            raise M3NetInputError(f"cannot create the cache beside {self.destination}: {err}") from err

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is not None or self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)

    def add(self, index: int, image: sitk.Image, centre_lps: Sequence[float], row: dict) -> None:
        """Sample nodule ``index``'s pyramid from ``image`` around ``centre_lps`` and keep its row."""
        cubes = {spec.name: sample_scale(image, centre_lps, spec, self.preprocessing.outside_hu) for spec in self.specs}
        self.add_cubes(index, cubes, centre_lps, row)

    def add_cubes(self, index: int, cubes: dict[str, np.ndarray], centre_lps: Sequence[float], row: dict) -> None:
        """Store already sampled cubes (HU, ``[z, y, x]``, one per pyramid scale) for nodule ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"nodule index {index} outside 0..{self.count - 1}")
        for spec in self.specs:
            cube = np.asarray(cubes[spec.name])
            if cube.shape != spec.tensor_shape:
                raise ValueError(f"{spec.name} cube has shape {cube.shape}, expected {spec.tensor_shape}")
            self.pyramids[spec.name][index] = np.clip(np.round(cube), -32768, 32767).astype(np.int16)
        self.rows[index] = dict(row) | {
            "index": index,
            **{name: round(float(v), 4) for name, v in zip(CENTRE_COLUMNS, centre_lps, strict=True)},
        }

    def commit(self, *, allow_missing: bool = False) -> Path:
        """Write the manifest and description, flush the pyramids, and move the cache into place.

        Args:
            allow_missing: keep only the nodules that were added (their order kept, indices
                renumbered) instead of refusing an incomplete cache.
        """
        kept = [i for i, row in enumerate(self.rows) if row is not None]
        if len(kept) < self.count:
            if not allow_missing:
                missing = self.count - len(kept)
                raise M3NetInputError(f"cache incomplete: {missing} of {self.count} nodules were not added")
            if not kept:
                raise M3NetInputError("no nodule could be added: no cache written")
            self._compact(kept)
        for array in self.pyramids.values():
            array.flush()
        self.pyramids.clear()
        write_text_atomic(self.work / "manifest.csv", rows_to_csv(self.rows))
        write_text_atomic(self.work / "cache.json", json.dumps(self.info, indent=2) + "\n")
        os.replace(self.work, self.destination)
        return self.destination


    def _compact(self, kept: list[int]) -> None:
        """Rewrite the pyramids with only the ``kept`` nodules."""
        for spec in self.specs:
            file = self.work / f"pyramid_{spec.name}.npy"
            compact = np.lib.format.open_memmap(
                file.with_suffix(".compact.npy"), mode="w+", dtype=np.int16, shape=(len(kept), *spec.tensor_shape)
            )
            for new, old in enumerate(kept):
                compact[new] = self.pyramids[spec.name][old]
            compact.flush()
            del self.pyramids[spec.name]
            os.replace(file.with_suffix(".compact.npy"), file)
            self.pyramids[spec.name] = np.load(file, mmap_mode="r+")
        self.rows = [self.rows[old] | {"index": new} for new, old in enumerate(kept)]
        self.count = self.info["count"] = len(kept)


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache for reading (pyramids memory-mapped).

    Raises:
        M3NetInputError: not a cache, another format version, or inconsistent files.
    """
    path = Path(path)
    info_path = path / "cache.json"
    if not info_path.is_file():
        raise M3NetInputError(f"{path} is not an M3Net cache (no cache.json)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise M3NetInputError(f"{info_path} is corrupt: {err}") from err
    if not isinstance(info, dict):
        raise M3NetInputError(f"{info_path} is corrupt: not a mapping")
    if info.get("format") != FORMAT_NAME or info.get("format_version") != FORMAT_VERSION:
        raise M3NetInputError(
            f"{path} is cache format {info.get('format')} v{info.get('format_version')}; "
            f"this m3net-core reads {FORMAT_NAME} v{FORMAT_VERSION}"
        )
    if not isinstance(info.get("pyramid"), list) or not (path / "manifest.csv").is_file():
        raise M3NetInputError(f"{path} is an incomplete cache (no pyramid description or manifest.csv)")
    for entry in info["pyramid"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and _is_grid(entry.get("grid"))
                and _is_grid(entry.get("field_of_view_mm"), kind=(int, float))):  # fmt: skip
            raise M3NetInputError(f"{info_path} is corrupt: a pyramid entry without name, grid or field of view")
    rows = read_rows_csv(path / "manifest.csv")
    _check_rows(rows, path / "manifest.csv")
    pyramids = {}
    for entry in info["pyramid"]:
        file = path / f"pyramid_{entry['name']}.npy"
        try:
            pyramids[entry["name"]] = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise M3NetInputError(f"{file} is missing or corrupt: {err}") from err
        if pyramids[entry["name"]].shape != (len(rows), *entry["grid"][::-1]):
            raise M3NetInputError(f"{file} holds {pyramids[entry['name']].shape}, not {len(rows)} cubes")
    return Cache(path=path, info=info, rows=rows, pyramids=pyramids)


def cache_digest(cache: Cache) -> str:
    """SHA-256 of what a run on ``cache`` depends on: each cube's nodule, patient, fold and labels, and the grids.

    A cache rebuilt at the same path with other nodules, folds or labels has another digest.
    """
    import hashlib

    columns = sorted({k for row in cache.rows for k in row if k.startswith("label_")} | {"nodule_id", "patient_id",
                                                                                          "fold"})  # fmt: skip
    table = [[row.get(c) for c in columns] for row in cache.rows]
    text = json.dumps({"columns": columns, "rows": table, "pyramid": cache.info["pyramid"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_grid(value: object, kind: type | tuple[type, ...] = int) -> bool:
    """Three positive numbers (``bool`` is not a number here)."""
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in value))  # fmt: skip


def _check_rows(rows: list[dict], manifest: Path) -> None:
    """Every nodule named, of a patient, in a whole-number fold (or none), with labels 0, 1 or none."""
    for number, row in enumerate(rows, start=2):
        problem = None
        if row.get("nodule_id") is None or row.get("patient_id") is None:
            problem = "no nodule_id or patient_id"
        elif not (row.get("fold") is None or isinstance(row["fold"], int)):
            problem = f"fold {row['fold']!r} is not a whole number"
        else:
            bad = [k for k, v in row.items() if k.startswith("label_") and v not in (None, 0, 1)]
            if bad:
                problem = f"{bad[0]} is {row[bad[0]]!r}, not 0, 1 or empty"
        if problem:
            raise M3NetInputError(f"{manifest} line {number}: {problem}")
    _check_one_fold_per_patient(rows, manifest)


def _check_one_fold_per_patient(rows: list[dict], manifest: Path) -> None:
    """Folds are by patient: a patient's nodules in two folds (or one in none) would train on the test fold."""
    fold_of: dict[str, tuple[object, int]] = {}
    for number, row in enumerate(rows, start=2):
        patient = str(row["patient_id"])
        first = fold_of.setdefault(patient, (row.get("fold"), number))
        if first[0] != row.get("fold"):
            raise M3NetInputError(
                f"{manifest} line {number}: patient {patient!r} is in fold {row.get('fold')!r} here and in fold "
                f"{first[0]!r} on line {first[1]}; folds are by patient, or a held-out score is not held out"
            )
