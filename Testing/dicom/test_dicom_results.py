"""`m3net predict --dicom`: the SR and Parametric Maps pass dciodvfy and read back as what predict returned."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from m3netcore.cli import main
from m3netcore.dicom_out import PRIVATE_SCHEME, attention_code, heatmap_code

DCIODVFY = shutil.which("dciodvfy")
# Warnings we accept, and why:
# - "Unrecognized defined term = <99M3NET>": our private coding scheme (scale attention and the
#   heatmap reference have no public codes); DICOM reserves "99..." designators for that, and the
#   SR declares it in its Coding Scheme Identification Sequence.
# - "Unrecognized defined term = <QUANTITY>" (Image Type / Frame Type value 4 of the Parametric
#   Map): highdicom's Derived Pixel Contrast for a map of a quantity; dicom3tools' list of terms
#   for this value predates it.
ACCEPTED_WARNINGS = ("Unrecognized defined term = <99M3NET>", "Unrecognized defined term = <QUANTITY>")


def dciodvfy(path) -> tuple[list[str], list[str]]:
    done = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)")
def test_sr_and_parametric_maps_pass_dciodvfy(predicted):
    files = sorted((predicted.out / "dicom").glob("*.dcm"))
    assert [p.name for p in files] == ["01_P-1_heatmap.dcm", "02_P-2_heatmap.dcm", "SR.dcm"]
    for path in files:
        errors, warnings = dciodvfy(path)
        assert errors == [], (path.name, errors)
        unexpected = [w for w in warnings if not any(accepted in w for accepted in ACCEPTED_WARNINGS)]
        assert unexpected == [], (path.name, unexpected)
    done = subprocess.run([DCIODVFY, "-new", str(predicted.out / "dicom" / "SR.dcm")], capture_output=True, text=True)
    assert "Comprehensive3DSR" in done.stdout + done.stderr  # it validated the file as the IOD we meant


def test_sr_reads_back_as_what_predict_returned(predicted, dicom_ct):
    sr = hd.sr.srread(predicted.out / "dicom" / "SR.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.PatientID, sr.StudyInstanceUID) == (dicom_ct.patient_id, dicom_ct.study)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(predicted.document["nodules"]) == 2
    for group, nodule in zip(groups, predicted.document["nodules"], strict=True):
        assert group.tracking_identifier == nodule["label"]
        (probability,) = group.get_measurements(name=codes.DCM.ProbabilityOfCancer)
        assert probability.value == pytest.approx(nodule["probability"], abs=1e-6)
        (point,) = probability.referenced_coordinates
        assert point.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert point.frame_of_reference_uid == dicom_ct.frame
        assert np.allclose(point.value, nodule["point_lps"], atol=1e-4)
        (impression,) = group.get_qualitative_evaluations(name=codes.DCM.Impression)
        expected = codes.SCT.Malignant if nodule["prediction"] == "malignant" else codes.SCT.Benign
        assert impression.value == expected
        for scale, weight in nodule["scale_attention"].items():
            (measured,) = group.get_measurements(name=attention_code(scale))
            assert measured.value == pytest.approx(weight, abs=1e-6)
        assert group.finding_type == codes.SCT.Nodule
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME


def test_sr_references_the_ct_series_and_its_heatmaps(predicted, dicom_ct):
    sr = hd.sr.srread(predicted.out / "dicom" / "SR.dcm")
    maps = [pydicom.dcmread(p) for p in sorted((predicted.out / "dicom").glob("*_heatmap.dcm"))]
    evidence = {uid: (study, series) for study, series, uid, _ in sr.get_evidence()}
    for sop in dicom_ct.sop:
        assert evidence[sop] == (dicom_ct.study, dicom_ct.series)
    for pm in maps:
        assert evidence[pm.SOPInstanceUID] == (dicom_ct.study, pm.SeriesInstanceUID)
    for group, pm in zip(sr.content.get_image_measurement_groups(), maps, strict=True):
        concept = heatmap_code().value
        (item,) = [i for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == concept]
        assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pm.SOPInstanceUID
    assert sr.SeriesInstanceUID not in (dicom_ct.series, maps[0].SeriesInstanceUID)  # results are series of their own


def test_parametric_map_is_the_combined_heatmap_on_the_cts_frame(predicted, dicom_ct):
    for nodule, name in zip(predicted.document["nodules"], ("01_P-1_heatmap.dcm", "02_P-2_heatmap.dcm"), strict=True):
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(predicted.out / "dicom" / name))
        assert pm.FrameOfReferenceUID == dicom_ct.frame
        assert (pm.PatientID, pm.StudyInstanceUID) == (dicom_ct.patient_id, dicom_ct.study)
        volume = pm.get_volume()
        heatmap = sitk.ReadImage(str(predicted.out / nodule["heatmap_files"]["combined"]))
        values = sitk.GetArrayFromImage(heatmap)  # [k, j, i]
        # every map voxel's LPS position, found in the NRRD heatmap by the NRRD's own geometry
        index = np.stack(np.meshgrid(*(np.arange(n) for n in volume.array.shape), indexing="ij"), -1).reshape(-1, 3)
        world = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        origin, spacing = np.asarray(heatmap.GetOrigin()), np.asarray(heatmap.GetSpacing())
        ijk = np.rint((world - origin) / spacing).astype(int)  # the heatmap grid is LPS-aligned
        assert np.allclose((world - origin) / spacing, ijk, atol=1e-4)
        assert np.array_equal(volume.array.reshape(-1), values[ijk[:, 2], ijk[:, 1], ijk[:, 0]])
        centre = volume.affine @ [*((np.asarray(volume.array.shape) - 1) / 2), 1.0]
        assert np.allclose(centre[:3], nodule["point_lps"], atol=1e-4)
        slice_thickness = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
        assert float(slice_thickness) == pytest.approx(spacing[2])  # the map's own slices, not the CT's 2 mm


def test_dicom_results_are_refused_for_an_image_file(tmp_path, capsys):
    image = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16) - 1000, str(image))
    status = main(["predict", str(image), "--point=0,0,0", "--dicom", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("m3net: error: --dicom needs a DICOM series") and "ct.nrrd" in err[0]
    assert not (tmp_path / "out").exists()
