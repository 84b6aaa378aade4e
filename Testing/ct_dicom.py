"""Write CT Image Storage slices with pydicom, for the tests that read real DICOM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    *,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    instance: int,
    frame_uid: str = "1.2.826.0.1.3680043.8.498.11",
    sop_uid: str | None = None,
) -> None:
    """One slice ``hu`` (``[row, column]``) as int16 with RescaleIntercept -1024.

    ``orientation`` is ImageOrientationPatient (row direction, then column direction);
    ``pixel_spacing`` is DICOM's (spacing between rows, spacing between columns).
    """
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.PatientName = "Phantom^Test"
    ds.StudyInstanceUID = study_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.10f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = f"{slice_thickness:g}"
    hu = np.asarray(hu)
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.PixelData = (hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
