"""The nodule table: one row per nodule with ratings, labels under every protocol and fold.

The same columns serve ``m3net lidc nodules``, the statistics, the reference baselines
and a training cache's ``manifest.csv`` (which adds each nodule's LPS centre).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m3netcore.atomic import write_text_atomic
from m3netcore.data.folds import patient_folds
from m3netcore.data.labels import PROTOCOLS, malignancy_label
from m3netcore.data.lidc import RATING_NAMES, Nodule, default_database_path, load_nodules
from m3netcore.errors import M3NetInputError

FOLDS = 5
FOLD_SEED = 0
TABLE_VERSION = 1  # bump when the columns or their meaning change (invalidates caches)
OTHER_RATINGS = tuple(name for name in RATING_NAMES if name != "malignancy")


def nodule_rows(nodules: Sequence[Nodule]) -> list[dict]:
    """Table rows for ``nodules``: identity, geometry, ratings, labels and patient-level folds."""
    rows = []
    for nodule in nodules:
        malignancy = nodule.ratings["malignancy"]
        row = {
            "nodule_id": nodule.nodule_id,
            "patient_id": nodule.patient_id,
            "series_uid": nodule.series_uid,
            "scan_id": nodule.scan.id,
            "centre_column": round(nodule.centre_pixel[0], 3),
            "centre_row": round(nodule.centre_pixel[1], 3),
            "centre_z_mm": round(nodule.centre_pixel[2], 3),
            "pixel_spacing_mm": nodule.scan.pixel_spacing_mm,
            "slice_spacing_mm": round(nodule.scan.slice_spacing_mm, 4),
            "diameter_mm": round(nodule.diameter_mm, 3),
            "volume_mm3": round(nodule.volume_mm3, 2),
            "readers": nodule.readers,
            "malignancy_ratings": ";".join(str(r) for r in malignancy),
            "malignancy_mean": round(nodule.malignancy_mean, 4),
            "malignancy_median": nodule.malignancy_median,
        }
        row |= {f"mean_{name}": round(nodule.mean_rating(name), 4) for name in OTHER_RATINGS}
        row |= {f"{name}_ratings": ";".join(str(r) for r in nodule.ratings[name]) for name in OTHER_RATINGS}
        try:
            row |= {f"label_{p}": malignancy_label(malignancy, p) for p in PROTOCOLS}
        except ValueError as err:  # a rating outside 1..5 in the database
            raise M3NetInputError(f"nodule {nodule.nodule_id}: {err}") from err
        rows.append(row)
    strata = [int(np.clip(round(r["malignancy_mean"]), 1, 5)) for r in rows]
    try:
        folds = patient_folds([r["patient_id"] for r in rows], strata, folds=FOLDS, seed=FOLD_SEED)
    except ValueError as err:
        raise M3NetInputError(f"cannot split these nodules into folds: {err}") from err
    for row, fold in zip(rows, folds, strict=True):
        row["fold"] = int(fold)
    return rows


def lidc_rows(database: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """The table of every LIDC nodule, computed once per database and kept in a cache.

    The cache file is named by the database's SHA-256 and by the source of the modules that
    compute the table, so a new database or changed code is recomputed (about 40 s on a
    2-core machine).
    """
    path = Path(database) if database is not None else default_database_path()
    if not path.is_file():
        raise M3NetInputError(f"no LIDC annotation database at {path}")
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cached = cache / f"lidc-nodules-v{TABLE_VERSION}-{_sha256(path)[:12]}-{_code_digest()[:12]}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged cache is recomputed
    nodules = load_nodules(path)
    if not nodules:
        raise M3NetInputError(f"{path} holds no annotated nodules")
    rows = nodule_rows(nodules)
    try:
        write_text_atomic(cached, json.dumps(rows))
    except OSError:
        pass  # a read-only home still gets its answer, just not cached
    return rows


def rows_to_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def write_rows_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    if not rows:
        raise M3NetInputError("no nodules to write")
    write_text_atomic(path, rows_to_csv(rows))


def read_rows_csv(path: str | os.PathLike) -> list[dict]:
    """Rows as written by :func:`write_rows_csv`, numbers parsed back, empty cells ``None``.

    Raises:
        M3NetInputError: a row with more or fewer cells than the header (a cut-off file),
            or a file that is not UTF-8 text.
    """
    missing = object()
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, restval=missing)
            for number, row in enumerate(reader, start=2):
                if None in row or any(v is missing for v in row.values()):
                    raise M3NetInputError(f"{path} line {number} does not have the header's "
                                          f"{len(reader.fieldnames)} cells (a cut-off or damaged file?)")  # fmt: skip
                rows.append({k: _parse(v) for k, v in row.items()})
    except (UnicodeDecodeError, csv.Error) as err:
        raise M3NetInputError(f"{path} is not a readable CSV table: {err}") from err
    return rows


def label_counts(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """Per protocol: how many nodules are benign, malignant and left out."""
    counts = {}
    for protocol in PROTOCOLS:
        labels = [row[f"label_{protocol}"] for row in rows]
        counts[protocol] = {
            "benign": sum(1 for v in labels if v == 0),
            "malignant": sum(1 for v in labels if v == 1),
            "excluded": sum(1 for v in labels if v is None),
        }
    return counts


def _parse(text: str):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _code_digest() -> str:
    """SHA-256 of the modules whose code decides the table's content."""
    import sklearn

    from m3netcore.data import folds, labels, lidc

    digest = hashlib.sha256(f"{TABLE_VERSION} sklearn {sklearn.__version__}".encode())
    for module in (lidc, labels, folds):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    """``$M3NET_CACHE_DIR``, else ``$XDG_CACHE_HOME/m3net``, else ``~/.cache/m3net``."""
    if os.environ.get("M3NET_CACHE_DIR"):
        return Path(os.environ["M3NET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m3net"
