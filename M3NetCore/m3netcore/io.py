"""Read a CT: a DICOM series folder, NRRD, NIfTI or MHA/MHD, in HU, geometry untouched.

SimpleITK keeps spacing, origin and direction exactly as the file says; nothing here
reorients. What is checked: one 3D scalar volume with voxel sizes a CT can have; for DICOM,
one series (chosen by SeriesInstanceUID when a folder holds several) of evenly spaced
slices of one orientation; and whether the values look like Hounsfield units (a warning).

One case is resampled: voxel axes that are not perpendicular. A gantry-tilted DICOM series
steps from slice to slice along a direction that is not the slices' normal; read as a plain
grid, every slice but the first would be shifted (by tens of mm over a scan). Such an image
is resampled, linearly, onto a regular grid in patient space with the slices' own row and
column directions, as 3D Slicer's "acquisition geometry regularization" does, with a
warning. Axes more than ``MAX_AXIS_TILT_DEG`` from perpendicular are refused.
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
# A voxel side outside these bounds is not a CT in millimetres (a file in metres or in
# micrometres); crops average CT voxels over a view voxel, so 0.001 mm would need terabytes.
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
PERPENDICULAR_TOLERANCE = 1e-4  # |cos| between two voxel axes still counted as perpendicular
MAX_AXIS_TILT_DEG = 45.0  # gantry tilt reaches about 30 degrees
MAX_REGULARISED_GROWTH = 4.0  # the regular grid may hold at most this many times the voxels
POSITION_TAG = "0020|0032"
ORIENTATION_TAG = "0020|0037"
SERIES_UID_TAG = "0020|000e"
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


def read_image(path: str | os.PathLike, *, series_uid: str | None = None) -> sitk.Image:
    """Read a CT in HU.

    Args:
        path: a folder with one DICOM series (or several, with ``series_uid``), or a
            NRRD / NIfTI / MHA / MHD file.
        series_uid: the SeriesInstanceUID to read from a folder with several series.

    Returns:
        A 3D scalar ``SimpleITK.Image`` with the file's own spacing, origin and direction;
        an image whose voxel axes are not perpendicular (a gantry-tilted series) resampled
        onto a regular grid in patient space (with an :class:`M3NetWarning`).

    Raises:
        M3NetInputError: missing path, unreadable file, not a 3D scalar image, voxel sizes
            no CT has, several DICOM series and none chosen, missing slices, slices of
            several orientations, axes too far from perpendicular.
    """
    return read_image_and_files(path, series_uid=series_uid)[0]


def read_image_and_files(path: str | os.PathLike, *, series_uid: str | None = None) -> tuple[sitk.Image, list[str]]:
    """:func:`read_image`, and the files the image was read from (a DICOM series' files in order, or the file).

    For callers that go on to describe the series (:func:`m3netcore.provenance.provenance`
    takes ``dicom_files``), so that a folder is not scanned twice.
    """
    path = Path(path)
    if not path.exists():
        raise M3NetInputError(f"no such file or folder: {path}")
    files = [str(path)]
    if path.is_dir():
        image, files = _read_dicom_series(path, series_uid)
    else:
        if series_uid is not None:
            raise M3NetInputError("series_uid applies to DICOM folders only")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise M3NetInputError(f"cannot read {path} as an image: {_first_line(err)}") from err
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # a 3D volume stored as one time point
            image = image[:, :, :, 0]
    check_image(image, source=str(path), perpendicular_axes=False)
    image = regular_grid(image, source=str(path))
    _warn_if_slab(image, source=str(path))
    warn_if_not_hu(image, source=str(path))
    return image, list(files)


def series_uid_of(image: sitk.Image, path: str | os.PathLike | None = None) -> str | None:
    """The image's SeriesInstanceUID: from DICOM, or a LUNA16-style ``<uid>.mhd`` file name."""
    if image.HasMetaDataKey(SERIES_UID_TAG):
        return image.GetMetaData(SERIES_UID_TAG).strip()
    if path is not None and Path(path).suffix.lower() in (".mhd", ".mha"):
        stem = Path(path).stem
        if _DICOM_UID.fullmatch(stem):  # LUNA16 names each scan <SeriesInstanceUID>.mhd
            return stem
    return None


def check_image(image: sitk.Image, source: str = "image", *, perpendicular_axes: bool = True) -> None:
    """Raise :class:`M3NetInputError` unless ``image`` is one 3D scalar volume a CT can be.

    Checked: one component, three dimensions, at least two voxels along each axis, each
    voxel side within ``MIN_SPACING_MM``..``MAX_SPACING_MM``, a finite origin, and a
    direction matrix whose axes are independent and (``perpendicular_axes``) perpendicular.
    """
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
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM:
        raise M3NetInputError(
            f"{source}: voxel size {_mm(spacing)} mm is outside {MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm per axis: "
            "not a CT in millimetres (a file in metres or micrometres?)"
        )
    if not np.all(np.isfinite(image.GetOrigin())):
        raise M3NetInputError(f"{source}: its origin {_mm(image.GetOrigin())} is not a point")
    axes = _unit_axes(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3))
    if axes is None or abs(np.linalg.det(axes)) < 1e-3:
        raise M3NetInputError(f"{source}: its direction matrix {_mm(image.GetDirection())} has dependent axes")
    tilt = _axis_tilt_deg(axes)
    if perpendicular_axes and tilt > 0:
        raise M3NetInputError(
            f"{source}: its voxel axes are {tilt:.3g} degrees from perpendicular (a sheared grid); "
            "read it with m3netcore.read_image, which resamples it onto a regular grid"
        )


HU_CHECK_SAMPLE = 262_144  # voxels (64^3) whose percentiles say whether an image is in HU


def warn_if_not_hu(image: sitk.Image, source: str = "image") -> bool:
    """Warn (and return False) if the intensities do not look like a CT in Hounsfield units.

    A chest CT has air near -1000 HU and nothing far below -1024; values only in [0, 1]
    or [0, 255], or no air at all, mean the image was normalised or is not a CT.
    """
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, int(np.ceil((array.size / HU_CHECK_SAMPLE) ** (1 / 3))))  # percentiles of a sample are enough
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


def regular_grid(image: sitk.Image, source: str = "image") -> sitk.Image:
    """``image`` itself if its voxel axes are perpendicular; else resampled onto a regular grid in patient space.

    The grid keeps the first axis, the plane of the first two (a DICOM slice's rows and
    columns) and the handedness; its voxel sides are the distances between the original
    index planes. Linear interpolation; outside the original volume, its lowest value.
    Integer images stay integer (rounded).

    Raises:
        M3NetInputError: axes more than ``MAX_AXIS_TILT_DEG`` from perpendicular, or a
            regular grid of more than ``MAX_REGULARISED_GROWTH`` times the voxels.
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    axes = _unit_axes(direction)
    if axes is None:
        raise M3NetInputError(f"{source}: its direction matrix {_mm(image.GetDirection())} has dependent axes")
    tilt = _axis_tilt_deg(axes)
    if tilt == 0:
        return image
    if tilt > MAX_AXIS_TILT_DEG:
        raise M3NetInputError(
            f"{source}: its voxel axes are {tilt:.1f} degrees from perpendicular, more than the "
            f"{MAX_AXIS_TILT_DEG:g} degrees a gantry tilt reaches: refusing to read it as a grid"
        )
    frame, triangle = np.linalg.qr(axes)
    signs = np.sign(np.diag(triangle))
    frame, triangle = frame * signs, triangle * signs[:, None]  # keep each axis's sense and the handedness
    lengths = np.linalg.norm(direction, axis=0)  # a direction column longer than 1 stretches its axis
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64) * lengths * np.diag(triangle)
    size = np.asarray(image.GetSize())
    corners = np.asarray([image.TransformIndexToPhysicalPoint([int(c) for c in corner * (size - 1)])
                          for corner in np.ndindex(2, 2, 2)])  # fmt: skip
    local = (corners - corners[0]) @ frame
    low, high = local.min(axis=0), local.max(axis=0)
    grid_size = np.ceil((high - low) / spacing - 1e-6).astype(int) + 1
    if np.prod(grid_size.astype(float)) > MAX_REGULARISED_GROWTH * np.prod(size.astype(float)):
        raise M3NetInputError(
            f"{source}: its voxel axes are {tilt:.1f} degrees from perpendicular and a regular grid around it "
            f"would need {_mm(grid_size)} voxels: refusing to read it as a grid"
        )
    array = sitk.GetArrayViewFromImage(image)
    fill = float(array.min())
    resampled = sitk.Resample(
        image, [int(n) for n in grid_size], sitk.Transform(), sitk.sitkLinear,
        (corners[0] + frame @ low).tolist(), spacing.tolist(), frame.ravel().tolist(), fill, sitk.sitkFloat32,
    )  # fmt: skip
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        values = np.clip(np.rint(sitk.GetArrayViewFromImage(resampled)), info.min, info.max).astype(array.dtype)
        regular = sitk.GetImageFromArray(values)
        regular.CopyInformation(resampled)
        resampled = regular
    for key in image.GetMetaDataKeys():
        resampled.SetMetaData(key, image.GetMetaData(key))
    warnings.warn(
        f"{source}: its voxel axes are {tilt:.1f} degrees from perpendicular (a gantry-tilted or sheared "
        f"acquisition): resampled onto a regular grid in patient space, {_mm(grid_size)} voxels of "
        f"{_mm(spacing)} mm",
        M3NetWarning,
        stacklevel=3,
    )
    return resampled


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, list[str]]:
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
        return image, list(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise M3NetInputError(f"cannot read DICOM series {series_uid} in {folder}: {_first_line(err)}") from err
    _check_slice_positions(reader, len(files), image, folder)
    image.SetMetaData(SERIES_UID_TAG, series_uid)
    return image, list(files)


def _check_slice_positions(reader: sitk.ImageSeriesReader, count: int, image: sitk.Image, folder: Path) -> None:
    """Refuse missing, duplicated or differently oriented slices; give a tilted series its true geometry.

    SimpleITK stacks whatever files it is given into a grid whose third axis is the slices'
    normal. A series whose slices step along another direction (gantry tilt) gets that
    step as its third axis here (a sheared grid, which :func:`regular_grid` resamples).
    """
    positions, orientations = [], []
    for i in range(count):
        if not (reader.HasMetaDataKey(i, POSITION_TAG) and reader.HasMetaDataKey(i, ORIENTATION_TAG)):
            return
        try:
            positions.append([float(v) for v in reader.GetMetaData(i, POSITION_TAG).split("\\")])
            orientations.append([float(v) for v in reader.GetMetaData(i, ORIENTATION_TAG).split("\\")])
        except ValueError:
            return
    positions, orientations = np.asarray(positions), np.asarray(orientations)
    if positions.shape != (count, 3) or orientations.shape != (count, 6) or not np.all(np.isfinite(positions)):
        return
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise M3NetInputError(f"DICOM series in {folder} mixes slices of different orientations: not one volume")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    normal = direction[:, 2]
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    median = float(np.median(along))
    step = (positions[-1] - positions[0]) / (count - 1)  # one slice to the next, on average
    deviation = np.linalg.norm(steps - step, axis=1)
    if median <= 0 or np.any(along <= 0) or np.any(deviation > SLICE_GAP_TOLERANCE * np.linalg.norm(step)):
        raise M3NetInputError(
            f"DICOM series in {folder} has unevenly spaced or duplicated slices "
            f"(steps {along.min():.3g}..{along.max():.3g} mm, median {median:.3g} mm): missing files?"
        )
    drift = (step - (step @ normal) * normal) * (count - 1)  # in-plane shift from first to last slice
    if np.linalg.norm(drift) <= 0.1 * min(image.GetSpacing()[:2]):
        return  # a plain grid: SimpleITK's geometry holds
    sheared = direction.copy()
    sheared[:, 2] = step / np.linalg.norm(step)
    image.SetDirection(sheared.ravel().tolist())
    image.SetSpacing([*image.GetSpacing()[:2], float(np.linalg.norm(step))])
    image.SetOrigin(positions[0].tolist())


def _warn_if_slab(image: sitk.Image, source: str) -> None:
    """A volume only a few voxels thick (a slab): most of every view lies outside it, read as air."""
    size, spacing = image.GetSize(), image.GetSpacing()
    thin = [axis for axis in range(3) if size[axis] < 3]
    if thin:
        axis = thin[0]
        warnings.warn(
            f"{source}: only {size[axis]} slices along axis {axis} ({size[axis] * spacing[axis]:.3g} mm): "
            "a slab, not a volume; views reaching beyond it see air there",
            M3NetWarning,
            stacklevel=3,
        )


def _unit_axes(direction: np.ndarray) -> np.ndarray | None:
    """The direction matrix's columns scaled to length 1; None if one is zero or not finite."""
    if not np.all(np.isfinite(direction)):
        return None
    norms = np.linalg.norm(direction, axis=0)
    if np.any(norms < 1e-6):
        return None
    return direction / norms


def _axis_tilt_deg(axes: np.ndarray) -> float:
    """How far (degrees) the unit columns of ``axes`` are from perpendicular; 0 within tolerance."""
    cosines = np.abs(axes.T @ axes - np.eye(3)).max()
    if cosines <= PERPENDICULAR_TOLERANCE:
        return 0.0
    return float(90.0 - np.degrees(np.arccos(min(1.0, cosines))))


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # SimpleITK's exceptions start with a source location; the last line is the reason.
    return lines[-1] if lines else type(err).__name__
