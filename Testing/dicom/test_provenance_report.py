"""Provenance in results.json and results.csv; the overview PNGs and the self-contained report.html."""

from __future__ import annotations

import csv
import datetime
import hashlib
import re

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import m3netcore
from m3netcore.checkpoint import bundled_registry, save_model
from m3netcore.figure import _plane
from m3netcore.provenance import CSV_FIELDS, node_attributes, provenance
from m3netcore.report import NOT_FOR_CLINICAL_USE


def test_results_carry_the_dicom_identifiers_model_checksum_and_time(predicted, dicom_ct):
    record = predicted.document["provenance"]
    header = pydicom.dcmread(next(dicom_ct.folder.glob("*.dcm")), stop_before_pixels=True)
    assert record["input"]["kind"] == "dicom"
    assert record["input"]["patient_id"] == header.PatientID == dicom_ct.patient_id
    assert record["input"]["study_instance_uid"] == dicom_ct.study
    assert record["input"]["series_instance_uid"] == dicom_ct.series
    assert record["input"]["frame_of_reference_uid"] == dicom_ct.frame
    assert record["model"]["sha256"] == bundled_registry()["demo"]["sha256"]
    assert (record["model"]["name"], record["device"]) == ("m3net-demo", "cpu")
    assert record["software"]["version"] == m3netcore.__version__
    when = datetime.datetime.fromisoformat(record["time"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(minutes=30)
    with open(predicted.out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and set(CSV_FIELDS) <= set(rows[0])
    for row in rows:
        assert (row["study_instance_uid"], row["series_instance_uid"]) == (dicom_ct.study, dicom_ct.series)
        assert row["model_sha256"] == record["model"]["sha256"] and row["time"] == record["time"]


def test_a_file_is_identified_by_its_checksum_and_a_model_file_by_its_own(tmp_path, untrained_model_file):
    image = sitk.Image([6, 6, 6], sitk.sitkInt16) - 1000
    path = tmp_path / "ct.mhd"
    sitk.WriteImage(image, str(path))  # a header and a .raw data file
    model = m3netcore.load_model(untrained_model_file)
    record = provenance(image, path, model, "cpu", model_source=untrained_model_file)
    assert record["input"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["input"]["data_file_sha256"] == hashlib.sha256((tmp_path / "ct.raw").read_bytes()).hexdigest()
    assert record["model"]["sha256"] == hashlib.sha256(open(untrained_model_file, "rb").read()).hexdigest()
    # without its source, the weights identify the model: the same weights give the same digest
    saved = tmp_path / "copy.safetensors"
    save_model(model, saved)
    first = provenance(image, path, model, "cpu")["model"]["weights_sha256"]
    assert first == provenance(image, path, m3netcore.load_model(saved), "cpu")["model"]["weights_sha256"]
    with __import__("torch").no_grad():
        next(model.network.parameters()).add_(1.0)
    assert provenance(image, path, model, "cpu")["model"]["weights_sha256"] != first


def test_report_html_is_self_contained_with_table_pictures_card_and_statement(predicted):
    page = (predicted.out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["'](https?:|//|file:)""", page)  # nothing to fetch
    assert "<script" not in page and "@import" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(predicted.document["nodules"]) == 2
    import base64

    for encoded, name in zip(images, ("01_P-1_overview.png", "02_P-2_overview.png"), strict=True):
        assert base64.b64decode(encoded) == (predicted.out / name).read_bytes()
    for nodule in predicted.document["nodules"]:
        assert f"<td>{nodule['label']}</td>" in page and f"{nodule['probability']:.3f}" in page
    assert page.count(NOT_FOR_CLINICAL_USE) == 2  # top and bottom
    assert predicted.document["provenance"]["input"]["series_instance_uid"] in page
    assert m3netcore.load_model("demo").card.strip().splitlines()[0][:40] in page.replace("&#x27;", "'")


def test_overview_png_shows_every_scale_in_three_planes(predicted):
    image = sitk.ReadImage(str(predicted.out / "01_P-1_overview.png"))
    assert image.GetNumberOfComponentsPerPixel() in (3, 4)
    width, height = image.GetSize()
    assert width > 500 and height > 500  # 3 x 3 panels with a colour bar


@pytest.mark.parametrize(
    ("plane", "top_left_lps"),
    [("axial", (-1, -1, 0)), ("coronal", (-1, 0, 1)), ("sagittal", (0, -1, 1))],
)
def test_planes_are_shown_in_radiological_orientation(plane, top_left_lps):
    """Axial: patient right on the left, anterior up; coronal and sagittal: superior up."""
    volume = np.zeros((5, 5, 5))  # [z, y, x], LPS-aligned; mark the corner a viewer shows top left
    corner = [{-1: 0, 0: 2, 1: 4}[v] for v in top_left_lps]  # x, y, z index
    volume[corner[2], corner[1], corner[0]] = 1.0
    picture, _ = _plane(volume, plane, np.array([1.0, 1.0, 1.0]))
    assert picture[0, 0] == 1.0


def test_one_dicom_file_unsaved_volumes_and_node_attributes(dicom_ct):
    """What the Slicer module passes: a file of the series (from its DICOM database), or nothing."""
    image = m3netcore.read_image(dicom_ct.folder)
    model = m3netcore.load_model("demo")
    from_file = provenance(image, next(dicom_ct.folder.glob("*.dcm")), model, "cpu", model_source="demo")
    assert from_file["input"]["study_instance_uid"] == dicom_ct.study
    assert from_file["input"]["frame_of_reference_uid"] == dicom_ct.frame
    unsaved = provenance(image, None, model, "cpu")
    assert unsaved["input"] == {"kind": "unsaved", "series_instance_uid": dicom_ct.series}
    attributes = node_attributes(from_file)
    assert attributes["M3Net.provenance.input.patient_id"] == dicom_ct.patient_id
    assert attributes["M3Net.provenance.model.sha256"] == bundled_registry()["demo"]["sha256"]
    assert all(isinstance(v, str) for v in attributes.values())


def test_a_dicom_file_names_its_own_series_in_a_folder_of_several(tmp_path):
    """A Slicer volume (no UID on the image) from one file of a folder holding two series: that file's series."""
    from dicom_series import write_ct_series

    from m3netcore.io import read_image_and_files
    from m3netcore.provenance import input_provenance

    first = write_ct_series(tmp_path / "a", patient_id="FIRST")
    second = write_ct_series(tmp_path / "b", patient_id="SECOND")
    shared = tmp_path / "shared"
    shared.mkdir()
    for name, folder in (("a", tmp_path / "a"), ("b", tmp_path / "b")):
        for file in folder.glob("*.dcm"):
            file.rename(shared / f"{name}-{file.name}")
    image = sitk.Image(4, 4, 4, sitk.sitkInt16)  # as converted from a volume node: no DICOM tags
    for uids, prefix in ((first, "a"), (second, "b")):
        record = input_provenance(image, shared / f"{prefix}-IM0003.dcm")
        assert record["series_instance_uid"] == uids.series
        assert record["patient_id"] == uids.patient_id
    for uids in (first, second):  # the files a read gave name the series without a second scan of the folder
        image, files = read_image_and_files(shared, series_uid=uids.series)
        told = input_provenance(image, shared, dicom_files=files)
        assert told == input_provenance(image, shared)
        assert told["series_instance_uid"] == uids.series and told["patient_id"] == uids.patient_id
