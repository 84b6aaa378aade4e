"""Read a CT: a DICOM series folder, NRRD, NIfTI or MHA/MHD, in HU, geometry untouched.

SimpleITK keeps spacing, origin and direction exactly as the file says; nothing here
reorients or resamples. What is checked: one 3D scalar volume; for DICOM, one series
(chosen by SeriesInstanceUID when a folder holds several) with evenly spaced slices; and
whether the values look like Hounsfield units (a warning, not an error).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m3netcore.errors import M3NetInputError, M3NetWarning

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
SLICE_GAP_TOLERANCE = 0.1  # relative deviation of a slice step from the median step
SERIES_UID_TAG = "0020|000e"
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


def read_image(path: str | os.PathLike, *, series_uid: str | None = None) -> sitk.Image:
    """Read a CT in HU.

    Args:
        path: a folder with one DICOM series (or several, with ``series_uid``), or a
            NRRD / NIfTI / MHA / MHD file.
        series_uid: the SeriesInstanceUID to read from a folder with several series.

    Returns:
        A 3D scalar ``SimpleITK.Image`` with the file's own spacing, origin and direction.

    Raises:
        M3NetInputError: missing path, unreadable file, not a 3D scalar image, several
            DICOM series and none chosen, missing slices.
    """
    path = Path(path)
    if not path.exists():
        raise M3NetInputError(f"no such file or folder: {path}")
    if path.is_dir():
        image = _read_dicom_series(path, series_uid)
    else:
        if series_uid is not None:
            raise M3NetInputError("series_uid applies to DICOM folders only")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise M3NetInputError(f"cannot read {path} as an image: {_first_line(err)}") from err
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # a 3D volume stored as one time point
            image = image[:, :, :, 0]
    check_image(image, source=str(path))
    warn_if_not_hu(image, source=str(path))
    return image


def series_uid_of(image: sitk.Image, path: str | os.PathLike | None = None) -> str | None:
    """The image's SeriesInstanceUID: from DICOM, or a LUNA16-style ``<uid>.mhd`` file name."""
    if image.HasMetaDataKey(SERIES_UID_TAG):
        return image.GetMetaData(SERIES_UID_TAG).strip()
    if path is not None and Path(path).suffix.lower() in (".mhd", ".mha"):
        stem = Path(path).stem
        if _DICOM_UID.fullmatch(stem):  # LUNA16 names each scan <SeriesInstanceUID>.mhd
            return stem
    return None


def check_image(image: sitk.Image, source: str = "image") -> None:
    """Raise :class:`M3NetInputError` unless ``image`` is one 3D scalar volume."""
    if not isinstance(image, sitk.Image):
        raise M3NetInputError(f"{source}: expected a SimpleITK.Image, got {type(image).__name__}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise M3NetInputError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "a CT has one"
        )
    dimension = image.GetDimension()
    size = image.GetSize()
    if dimension != 3:
        raise M3NetInputError(f"{source}: is a {dimension}D image of size {size}; a CT volume is 3D")
    if min(size[:3]) < 2:
        raise M3NetInputError(f"{source}: size {size[:3]} is a single slice, not a 3D volume")


def warn_if_not_hu(image: sitk.Image, source: str = "image") -> bool:
    """Warn (and return False) if the intensities do not look like a CT in Hounsfield units.

    A chest CT has air near -1000 HU and nothing far below -1024; values only in [0, 1]
    or [0, 255], or no air at all, mean the image was normalised or is not a CT.
    """
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float32)
    low, high = np.percentile(sample, [1, 99.5])
    problems = []
    if low > -500:
        problems.append(f"no air (1st percentile {low:.0f}, expected near -1000)")
    if sample.min() < -3100:
        problems.append(f"values down to {sample.min():.0f}, below any HU")
    if high - low <= 256:
        problems.append(f"a narrow range {low:.0f}..{high:.0f}, as after normalisation")
    if problems:
        warnings.warn(
            f"{source}: intensities do not look like Hounsfield units: {'; '.join(problems)}. "
            "Results are only meaningful for CT in HU.",
            M3NetWarning,
            stacklevel=3,
        )
        return False
    return True


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    if not series_ids:
        raise M3NetInputError(f"no DICOM series found in {folder}")
    if series_uid is None:
        if len(series_ids) > 1:
            listing = ", ".join(
                f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))} files)"
                for uid in series_ids
            )
            raise M3NetInputError(f"{folder} holds {len(series_ids)} DICOM series; choose one by UID: {listing}")
        series_uid = series_ids[0]
    elif series_uid not in series_ids:
        raise M3NetInputError(f"series {series_uid} not in {folder}; found: {', '.join(series_ids)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    if len(files) == 1:  # an enhanced (multi-frame) CT keeps the whole volume in one file
        try:
            image = sitk.ReadImage(files[0])
        except RuntimeError as err:
            raise M3NetInputError(f"cannot read DICOM file {files[0]}: {_first_line(err)}") from err
        image.SetMetaData(SERIES_UID_TAG, series_uid)
        return image
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise M3NetInputError(f"cannot read DICOM series {series_uid} in {folder}: {_first_line(err)}") from err
    _check_slice_positions(reader, len(files), image, folder)
    image.SetMetaData(SERIES_UID_TAG, series_uid)
    return image


def _check_slice_positions(reader: sitk.ImageSeriesReader, count: int, image: sitk.Image, folder: Path) -> None:
    """Refuse a series with missing or duplicated slices (SimpleITK would stack it silently)."""
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    positions = []
    for i in range(count):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return
        value = reader.GetMetaData(i, "0020|0032")
        try:
            positions.append(float(np.dot([float(v) for v in value.split("\\")], normal)))
        except ValueError:
            return
    steps = np.diff(np.sort(np.asarray(positions)))
    median = float(np.median(steps))
    if median <= 0 or np.any(np.abs(steps - median) > SLICE_GAP_TOLERANCE * median):
        raise M3NetInputError(
            f"DICOM series in {folder} has unevenly spaced or duplicated slices "
            f"(steps {steps.min():.3g}..{steps.max():.3g} mm, median {median:.3g} mm): missing files?"
        )


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # SimpleITK's exceptions start with a source location; the last line is the reason.
    return lines[-1] if lines else type(err).__name__
