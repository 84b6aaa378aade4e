"""A small chest-like CT series written with pydicom (one file per slice), for the DICOM results tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
from ct_dicom import write_ct_slice
from pydicom.uid import generate_uid

SIZE = (64, 64, 40)  # x, y, slices
SPACING_MM = (0.9, 0.9, 2.0)  # in-plane spacing unlike the heatmap grid's 1.5 mm, as in a real CT
ORIGIN_LPS = (-28.8, -28.8, -40.0)
NODULES_LPS = {"N-1": (6.3, -4.5, 1.0), "N-2": (-12.6, 9.0, -10.0)}


def write_ct_series(folder: Path, *, patient_id: str = "M3NET-TEST") -> SimpleNamespace:
    """A chest-like CT (air, body wall, lung, two soft-tissue nodules) as one DICOM file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = SimpleNamespace(study=generate_uid(), series=generate_uid(), frame=generate_uid(), patient_id=patient_id)
    x = ORIGIN_LPS[0] + SPACING_MM[0] * np.arange(SIZE[0])
    y = ORIGIN_LPS[1] + SPACING_MM[1] * np.arange(SIZE[1])
    column_x, row_y = np.meshgrid(x, y)  # [row, column]
    radius = np.hypot(column_x, row_y)
    uids.sop = []
    for k in range(SIZE[2]):
        z = ORIGIN_LPS[2] + SPACING_MM[2] * k
        hu = np.where(radius < 27.0, -850.0, 40.0)  # lung inside a soft-tissue wall
        hu = np.where(radius > 30.0, -1000.0, hu)  # air outside
        hu[:3, :] = 700.0  # a table-like bright strip: a CT's full HU range
        for centre in NODULES_LPS.values():
            distance = np.sqrt((column_x - centre[0]) ** 2 + (row_y - centre[1]) ** 2 + (z - centre[2]) ** 2)
            hu = np.where(distance < 5.0, 30.0, hu)
        path = folder / f"IM{k + 1:04d}.dcm"
        sop = generate_uid()
        write_ct_slice(path, hu, position=(ORIGIN_LPS[0], ORIGIN_LPS[1], z), orientation=(1, 0, 0, 0, 1, 0),
                       pixel_spacing=(SPACING_MM[1], SPACING_MM[0]), slice_thickness=SPACING_MM[2],
                       patient_id=patient_id, study_uid=uids.study, series_uid=uids.series, instance=k + 1,
                       frame_uid=uids.frame, sop_uid=sop)  # fmt: skip
        _complete_study(path)
        uids.sop.append(sop)
    return uids


def _complete_study(path: Path) -> None:
    """Add the Patient and Study attributes a scanner writes (and a DICOMDIR needs) to a test slice."""
    dataset = pydicom.dcmread(path)
    dataset.StudyDate, dataset.StudyTime, dataset.StudyID = "20260101", "120000", "1"
    dataset.AccessionNumber, dataset.ReferringPhysicianName = "", ""
    dataset.PatientBirthDate, dataset.PatientSex = "", "O"
    dataset.save_as(path, enforce_file_format=True)
