"""LIDC annotations: reading, grouping readers into nodules, consensus, the real database's numbers."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from conftest import rectangle, square, write_database

from m3netcore.data.lidc import load_nodules, read_database
from m3netcore.errors import M3NetInputError


def reader(column, row, half=4, slices=(10, 11, 12), malignancy=3, holes=()):
    contours = [(-100.0 + 1.25 * k, square(column, row, half), True) for k in slices]
    contours += [(-100.0 + 1.25 * k, square(c, r, h), False) for k, c, r, h in holes]
    return {"malignancy": malignancy, "contours": contours}


def test_readers_of_one_lesion_form_one_nodule_and_far_marks_another(tmp_path):
    database = write_database(
        tmp_path / "db.sqlite",
        [reader(100, 100, malignancy=4), reader(101, 100, malignancy=5), reader(100, 102, malignancy=3),
         reader(300, 300, malignancy=1)],
    )  # fmt: skip
    nodules = load_nodules(database)
    assert [n.readers for n in nodules] == [3, 1]
    first, second = nodules
    assert first.ratings["malignancy"] == [4, 5, 3]
    assert first.malignancy_mean == pytest.approx(4.0) and first.malignancy_median == 4
    assert first.nodule_id == "LIDC-IDRI-9999-s1-n1" and second.nodule_id == "LIDC-IDRI-9999-s1-n2"
    assert first.centre_pixel[2] == pytest.approx(-100.0 + 1.25 * 11)
    assert second.centre_pixel[:2] == pytest.approx((300.0, 300.0))


def test_consensus_keeps_voxels_inside_at_least_half_of_the_readers(tmp_path):
    # Outlines are drawn on the first pixels outside the nodule, so a 9x9 outline encloses
    # 7x7 pixels. Readers' interiors at columns 97-103, 101-107 and 105-111: columns
    # 101-103 and 105-107 are inside two of the three (104 is inside only the middle one).
    database = write_database(tmp_path / "db.sqlite", [reader(100, 100), reader(104, 100), reader(108, 100)])
    (nodule,) = load_nodules(database)
    assert nodule.mask.sum() == 6 * 7 * 3
    assert nodule.centre_pixel[:2] == pytest.approx((104.0, 100.0))
    assert nodule.volume_mm3 == pytest.approx(6 * 7 * 3 * 0.7 * 0.7 * 1.25)
    # each reader's largest in-plane extent is its outline's diagonal, 8 * sqrt(2) pixels
    assert nodule.diameter_mm == pytest.approx(8 * np.sqrt(2) * 0.7)


def test_with_two_readers_half_means_either(tmp_path):
    (nodule,) = load_nodules(write_database(tmp_path / "db.sqlite", [reader(100, 100), reader(104, 100)]))
    assert nodule.mask.sum() == 11 * 7 * 3


def test_outline_pixels_are_outside_but_a_tiny_outline_keeps_its_pixels(tmp_path):
    tiny = {"malignancy": 3, "contours": [(-100.0 + 1.25 * 10, [(50, 50), (51, 50), (51, 51)], True)]}
    (nodule,) = load_nodules(write_database(tmp_path / "db.sqlite", [tiny]))
    assert nodule.mask.sum() == 3


def test_rows_and_columns_are_not_swapped(tmp_path):
    wide = {"malignancy": 3, "contours": [(-100.0 + 1.25 * 10, rectangle(200, 80, 6, 2), True)]}
    (nodule,) = load_nodules(write_database(tmp_path / "db.sqlite", [wide]))
    rows, columns = np.nonzero(nodule.mask[0])
    assert np.ptp(columns) + 1 == 11 and np.ptp(rows) + 1 == 3  # interior of a 13 x 5 outline
    assert nodule.centre_pixel[:2] == pytest.approx((200.0, 80.0))


def test_exclusion_contours_cut_holes(tmp_path):
    database = write_database(tmp_path / "db.sqlite", [reader(100, 100, half=6, holes=[(11, 100, 100, 2)])])
    (nodule,) = load_nodules(database)
    middle = nodule.mask[1]  # slice 11
    row, column = 100 - nodule.mask_origin[1], 100 - nodule.mask_origin[2]
    assert not middle[row, column]
    assert nodule.mask[0][row, column] and nodule.mask[2][row, column]
    # 11x11 interiors on three slices, minus the hole's 3x3 interior
    assert nodule.mask.sum() == 11 * 11 * 3 - 9


def test_marks_without_outlines_are_ignored(tmp_path):
    empty = {"malignancy": 5, "contours": []}
    nodules = load_nodules(write_database(tmp_path / "db.sqlite", [reader(100, 100), empty]))
    assert [n.readers for n in nodules] == [1]


def test_more_than_four_touching_annotations_are_split(tmp_path):
    # Four readers overlap; a fifth mark touches them one pixel away: at most four per nodule.
    marks = [reader(100, 100)] * 4 + [reader(100, 109, half=4)]
    (group, *rest) = load_nodules(write_database(tmp_path / "db.sqlite", marks))
    assert group.readers == 4
    assert [n.readers for n in rest] == [1]


@pytest.mark.parametrize(
    ("statement", "message"),
    [("DROP TABLE contours", "no 'contours' table"), ("ALTER TABLE scans DROP COLUMN pixel_spacing", "pixel_spacing")],
)
def test_database_without_the_expected_tables_is_refused(tmp_path, statement, message):
    database = write_database(tmp_path / "db.sqlite", [reader(100, 100)])
    connection = sqlite3.connect(database)
    connection.execute(statement)
    connection.commit()
    connection.close()
    with pytest.raises(M3NetInputError, match=message):
        read_database(database)


def test_file_that_is_not_a_database_is_refused(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 10)
    with pytest.raises(M3NetInputError, match="not a readable LIDC annotation database"):
        read_database(junk)
    with pytest.raises(M3NetInputError, match="no LIDC annotation database"):
        read_database(tmp_path / "absent.sqlite")


# --- the real database ----------------------------------------------------------------------


def test_real_database_numbers_are_pinned(lidc_table):
    from m3netcore.data.manifest import label_counts

    assert len(lidc_table) == 2652  # LIDC.md: "expect about 2,650"
    assert len({r["patient_id"] for r in lidc_table}) == 875
    readers = np.bincount([min(r["readers"], 5) for r in lidc_table])
    assert list(readers[1:5]) == [771, 490, 481, 896]
    counts = label_counts(lidc_table)
    assert counts["mean-excl3"] == {"benign": 1366, "malignant": 646, "excluded": 640}
    assert counts["official"] == {"benign": 2006, "malignant": 646, "excluded": 0}
    assert counts["median-excl3"] == {"benign": 1151, "malignant": 546, "excluded": 955}
    # "About three in four nodules are then benign": the official protocol's floor.
    assert counts["official"]["benign"] / len(lidc_table) == pytest.approx(0.756, abs=0.005)


def test_real_nodules_have_plausible_geometry(lidc_table):
    diameters = np.asarray([r["diameter_mm"] for r in lidc_table])
    volumes = np.asarray([r["volume_mm3"] for r in lidc_table])
    assert 3.0 <= np.median(diameters) <= 15.0 and diameters.max() < 80.0
    assert np.all(volumes > 0)
    # bigger nodules look more malignant to readers: a known property of LIDC
    means = np.asarray([r["malignancy_mean"] for r in lidc_table])
    assert np.corrcoef(diameters, means)[0, 1] > 0.4
