"""m3netcore.points: Slicer markups, plain CSV and LUNA16 annotations, all to LPS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3netcore import M3NetInputError
from m3netcore.points import LabeledPoint, parse_point, read_points

SERIES_A = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
SERIES_B = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100332161840553388986847034053"


def markups_document(coordinate_system: str | None, control_points: list[dict]) -> dict:
    markup = {"type": "Fiducial", "controlPoints": control_points}
    if coordinate_system is not None:
        markup["coordinateSystem"] = coordinate_system
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
        "Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [markup],
    }


def control_point(label: str, position: list[float], status: str = "defined") -> dict:
    return {"id": label, "label": label, "position": position, "positionStatus": status}


def write_json(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- Slicer markups --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("coordinate_system", "expected_lps"),
    [("LPS", (10.0, -20.5, 30.0)), ("RAS", (-10.0, 20.5, 30.0)), ("ras", (-10.0, 20.5, 30.0))],
)
def test_markups_honour_their_coordinate_system(tmp_path, coordinate_system: str, expected_lps) -> None:
    path = write_json(
        tmp_path / "nodules.mrk.json",
        markups_document(coordinate_system, [control_point("N-1", [10.0, -20.5, 30.0])]),
    )

    points = read_points(path, coords="LPS")  # the file's own system wins over coords

    assert points == [LabeledPoint("N-1", expected_lps)]


def test_markups_skip_points_that_are_not_defined(tmp_path) -> None:
    path = write_json(
        tmp_path / "nodules.mrk.json",
        markups_document(
            "LPS",
            [
                control_point("placed", [1.0, 2.0, 3.0]),
                control_point("being-placed", [4.0, 5.0, 6.0], status="preview"),
                control_point("skipped", [0.0, 0.0, 0.0], status="undefined"),
                control_point("also-placed", [7.0, 8.0, 9.0]),
            ],
        ),
    )

    points = read_points(path)

    assert [p.label for p in points] == ["placed", "also-placed"]
    assert points[1].lps == (7.0, 8.0, 9.0)


def test_markups_without_labels_get_numbered(tmp_path) -> None:
    path = write_json(
        tmp_path / "nodules.mrk.json",
        markups_document("LPS", [{"position": [1.0, 2.0, 3.0]}, {"position": [4.0, 5.0, 6.0], "label": ""}]),
    )
    assert [p.label for p in read_points(path)] == ["P-1", "P-2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps(markups_document(None, [control_point("N-1", [1.0, 2.0, 3.0])])), "coordinateSystem"),
        ('{"markups": [', "not valid JSON"),
        ("", "not valid JSON"),
        ('{"points": []}', "no 'markups' list"),
        (json.dumps(markups_document("LPS", [control_point("N-1", [1.0, 2.0])])), "no 3D position"),
        (json.dumps(markups_document("LPS", [])), "contains no points"),
        (json.dumps(markups_document("LPS", [control_point("N-1", [1.0, 2.0, 3.0], "undefined")])), "no points"),
        (json.dumps(markups_document("IJK", [control_point("N-1", [1.0, 2.0, 3.0])])), "coords must be"),
        ('{"markups": ["x"]}', "must be an object"),
        (json.dumps(markups_document("LPS", ["x"])), "control point 1 is not an object"),
    ],
    ids=[
        "no-coordinate-system",
        "invalid-json",
        "empty-file",
        "not-markups",
        "2d-position",
        "no-control-points",
        "only-undefined",
        "unknown-system",
        "markup-not-object",
        "control-point-not-object",
    ],
)
def test_bad_markups_are_input_errors(tmp_path, text: str, message: str) -> None:
    path = write_text(tmp_path / "nodules.mrk.json", text)
    with pytest.raises(M3NetInputError, match=message):
        read_points(path)


# --- plain CSV ------------------------------------------------------------------------------


def test_csv_row_shorter_than_its_header_gets_a_numbered_label(tmp_path) -> None:
    path = write_text(tmp_path / "points.csv", "x,y,z,label\n1,2,3\n4,5,6,apex\n")
    assert [p.label for p in read_points(path)] == ["P-1", "apex"]


@pytest.mark.parametrize(
    ("coords", "expected"),
    [("LPS", [(1.5, -2.0, 3.0), (-4.0, 5.0, -6.25)]), ("RAS", [(-1.5, 2.0, 3.0), (4.0, -5.0, -6.25)])],
)
def test_plain_csv_in_the_given_coordinate_system(tmp_path, coords: str, expected) -> None:
    path = write_text(tmp_path / "points.csv", "x,y,z,label\n1.5,-2.0,3.0,upper lobe\n-4,5,-6.25,\n")

    points = read_points(path, coords=coords)

    assert [p.lps for p in points] == expected
    assert [p.label for p in points] == ["upper lobe", "P-2"]


def test_plain_csv_columns_are_found_by_name_in_any_case_and_order(tmp_path) -> None:
    path = write_text(tmp_path / "points.csv", "\ufeffLabel, Z ,X,Y\nA,3,1,2\n")
    assert read_points(path) == [LabeledPoint("A", (1.0, 2.0, 3.0))]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no data rows"),
        ("x,y,z\n", "no data rows"),
        ("x,y,z\n1.0,abc,3.0\n", "row 1 has non-numeric"),
        ("x,y,z\n1,2,3\n4,5\n", "row 2 has non-numeric"),
        ("x,y\n1,2\n", "expected columns x,y,z"),
        ("a;b;c\n1;2;3\n", "expected columns x,y,z"),
    ],
    ids=["empty", "header-only", "non-numeric", "short-row", "missing-column", "wrong-delimiter"],
)
def test_bad_csv_is_an_input_error(tmp_path, text: str, message: str) -> None:
    path = write_text(tmp_path / "points.csv", text)
    with pytest.raises(M3NetInputError, match=message):
        read_points(path)


def test_missing_points_file_is_an_input_error(tmp_path) -> None:
    with pytest.raises(M3NetInputError, match="no such points file"):
        read_points(tmp_path / "absent.csv")


def test_binary_file_is_an_input_error(tmp_path) -> None:
    path = tmp_path / "points.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(M3NetInputError):
        read_points(path)


# --- LUNA16 annotations.csv ---------------------------------------------------------------

LUNA16_TEXT = (
    "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    f"{SERIES_A},-128.6994211,-175.3192718,-298.3875064,5.651470635\n"
    f"{SERIES_A},103.7836509,-211.9251487,-227.12125,4.224708481\n"
    f"{SERIES_B},69.63901724,-140.9445859,876.3744957,5.786347814\n"
)


def test_luna16_rows_of_one_series_are_kept_as_lps(tmp_path) -> None:
    path = write_text(tmp_path / "annotations.csv", LUNA16_TEXT)

    points = read_points(path, coords="RAS", series_uid=SERIES_A)  # LUNA16 is world = LPS always

    assert points == [
        LabeledPoint("N-1", (-128.6994211, -175.3192718, -298.3875064)),
        LabeledPoint("N-2", (103.7836509, -211.9251487, -227.12125)),
    ]
    assert read_points(path, series_uid=SERIES_B) == [LabeledPoint("N-1", (69.63901724, -140.9445859, 876.3744957))]


def test_luna16_with_one_series_needs_no_uid(tmp_path) -> None:
    path = write_text(tmp_path / "annotations.csv", "\n".join(LUNA16_TEXT.splitlines()[:2]) + "\n")
    assert len(read_points(path)) == 1


def test_luna16_with_several_series_needs_the_uid(tmp_path) -> None:
    path = write_text(tmp_path / "annotations.csv", LUNA16_TEXT)
    with pytest.raises(M3NetInputError, match="annotates 2 series"):
        read_points(path)


def test_luna16_without_rows_for_the_series_is_an_input_error(tmp_path) -> None:
    path = write_text(tmp_path / "annotations.csv", LUNA16_TEXT)
    with pytest.raises(M3NetInputError, match="no annotation for series 1.2.3"):
        read_points(path, series_uid="1.2.3")


# --- --point ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("1,2,3", (1.0, 2.0, 3.0)), (" -1.5, 2e1 ,3 ", (-1.5, 20.0, 3.0))])
def test_parse_point_reads_a_triple(text: str, expected) -> None:
    assert parse_point(text) == expected


@pytest.mark.parametrize("text", ["1,2", "1,2,3,4", "a,b,c", ""])
def test_parse_point_rejects_what_is_not_a_triple(text: str) -> None:
    with pytest.raises(M3NetInputError, match="X,Y,Z"):
        parse_point(text)


@pytest.mark.parametrize("text", ["1,,2,3", "1,2,3,", ",1,2", "nan,1,2", "1,inf,2"])
def test_parse_point_rejects_empty_fields_and_non_finite_numbers(text: str) -> None:
    with pytest.raises(M3NetInputError, match="X,Y,Z|finite"):
        parse_point(text)


def test_luna25_files_are_matched_by_their_series_instance_uid_column(tmp_path) -> None:
    text = ("PatientID,SeriesInstanceUID,StudyDate,CoordX,CoordY,CoordZ,LesionID,label\n"
            f"100,{SERIES_A},20000102,-128.5,-175.25,-298.0,1,1\n"
            f"101,{SERIES_B},20000102,69.5,-140.0,876.0,1,0\n")  # fmt: skip
    path = write_text(tmp_path / "LUNA25_Public_Training_Development_Data.csv", text)
    assert read_points(path, series_uid=SERIES_B) == [LabeledPoint("N-1", (69.5, -140.0, 876.0))]


def test_points_for_image_keeps_the_rows_of_a_luna16_scan_named_by_its_uid(tmp_path, small_ct) -> None:
    import SimpleITK as sitk

    from m3netcore import read_image
    from m3netcore.points import points_for_image

    annotations = write_text(tmp_path / "annotations.csv", LUNA16_TEXT)
    scan = tmp_path / f"{SERIES_B}.mhd"
    sitk.WriteImage(small_ct, str(scan))
    image = read_image(scan)

    assert points_for_image(annotations, image, scan) == [LabeledPoint("N-1", (69.63901724, -140.9445859, 876.3744957))]
    with pytest.raises(M3NetInputError, match="annotates 2 series"):
        points_for_image(annotations, image)  # without the path the series is unknown


def test_unique_labels_number_repeats() -> None:
    from m3netcore.points import unique_labels

    assert unique_labels(iter(["N-1", "N-1", "P-1"])) == ["N-1", "N-1-2", "P-1"]
