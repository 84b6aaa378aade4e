"""Geometry DICOM does not describe as a plain grid: gantry tilt, sheared axes, odd voxel sizes.

Each series is written with pydicom slice by slice, with a bright sphere at a known LPS
point drawn at each pixel's true patient position, so a reader that takes a tilted series
for a plain grid finds the sphere millimetres away from where it is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from ct_dicom import write_ct_slice
from pydicom.uid import generate_uid

from m3netcore import M3NetInputError, M3NetWarning, default_preprocessing, extract_crops, read_image
from m3netcore.io import SERIES_UID_TAG

SPHERE_LPS = np.array([4.0, -6.0, -112.0])
SPHERE_RADIUS_MM = 6.0
SPHERE_HU, LUNG_HU, TISSUE_HU, AIR_HU = 300, -850, 40, -1000
BRIGHT_HU = 170  # between soft tissue and the sphere
ROWS, COLUMNS = 40, 44
PIXEL_SPACING_MM = 1.5
SLICES = 30
TABLE_STEP_MM = 2.0
FIRST_POSITION = np.array([-31.0, -36.0, -141.0])


def sphere_hu(points_lps: np.ndarray) -> np.ndarray:
    """A soft-edged bright sphere in lung, at the true patient positions ``points_lps`` (..., 3).

    Soft tissue behind it (y > 12 mm) and air to its right (x < -25 mm), as in a chest.
    """
    distance = np.linalg.norm(points_lps - SPHERE_LPS, axis=-1)
    hu = LUNG_HU + (SPHERE_HU - LUNG_HU) * 0.5 * (1.0 + np.tanh((SPHERE_RADIUS_MM - distance) / 0.7))
    hu = np.where(points_lps[..., 1] > 12.0, TISSUE_HU, hu)
    return np.where(points_lps[..., 0] < -25.0, AIR_HU, hu)


def write_tilted_series(folder: Path, tilt_deg: float, *, step_mm: float = TABLE_STEP_MM,
                        pixel_spacing_mm: float = PIXEL_SPACING_MM, slices: int = SLICES,
                        skip: tuple[int, ...] = ()) -> str:  # fmt: skip
    """A gantry-tilted axial series: slices tilted about the patient's left-right axis, the table stepping along z.

    Rows run along +x; columns along (0, cos t, sin t), so the slice normal leans away from
    the z axis the slices step along by ``tilt_deg`` (positive or negative).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tilt = np.radians(tilt_deg)
    row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(tilt), np.sin(tilt)])
    series_uid = generate_uid()
    j, i = np.meshgrid(np.arange(ROWS), np.arange(COLUMNS), indexing="ij")  # [row index, column index]
    for k in range(slices):
        if k in skip:
            continue
        position = FIRST_POSITION + k * np.array([0.0, 0.0, step_mm])
        points = position + i[..., None] * pixel_spacing_mm * row + j[..., None] * pixel_spacing_mm * column
        write_ct_slice(
            folder / f"IM{k:04d}.dcm",
            np.round(sphere_hu(points)),
            position=position,
            orientation=(*row, *column),
            pixel_spacing=(pixel_spacing_mm, pixel_spacing_mm),
            slice_thickness=step_mm * np.cos(tilt),
            patient_id="TILT",
            study_uid="1.2.826.0.1.3680043.8.498.20",
            series_uid=series_uid,
            instance=k + 1,
        )
    return series_uid


def bright_centroid_lps(image: sitk.Image) -> np.ndarray:
    """Where the sphere is in patient space: the centroid of voxels brighter than soft tissue."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    weights = np.clip(array - BRIGHT_HU, 0.0, None)
    k, j, i = np.nonzero(weights)
    points = np.asarray(
        [image.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k, strict=True)]
    )
    return (points * weights[k, j, i, None]).sum(axis=0) / weights[k, j, i].sum()


@pytest.mark.parametrize("tilt_deg", [20.0, -20.0], ids=["tilt-forward", "tilt-backward"])
def test_a_gantry_tilted_series_is_resampled_so_the_nodule_is_where_it_is(tmp_path, tilt_deg: float) -> None:
    uid = write_tilted_series(tmp_path / "tilted", tilt_deg)

    with pytest.warns(M3NetWarning, match="20.0 degrees from perpendicular.*resampled onto a regular grid"):
        image = read_image(tmp_path / "tilted")

    axes = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-9)  # a plain grid now
    np.testing.assert_allclose(bright_centroid_lps(image), SPHERE_LPS, atol=0.3)
    assert image.EvaluateAtPhysicalPoint(SPHERE_LPS.tolist(), sitk.sitkLinear) > SPHERE_HU - 30
    # 10 mm from the centre is lung, on every side: nothing of the sphere was shifted there
    for offset in np.vstack([np.eye(3), -np.eye(3)]) * 10.0:
        assert image.EvaluateAtPhysicalPoint((SPHERE_LPS + offset).tolist(), sitk.sitkLinear) < LUNG_HU + 30
    assert image.GetMetaData(SERIES_UID_TAG) == uid
    # the same scan without tilt is a plain grid: read as it is, no warning, same integer voxels
    write_tilted_series(tmp_path / "untilted", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", M3NetWarning)
        untilted = read_image(tmp_path / "untilted")
    assert untilted.GetSize() == (COLUMNS, ROWS, SLICES)
    assert untilted.GetSpacing() == pytest.approx((PIXEL_SPACING_MM, PIXEL_SPACING_MM, TABLE_STEP_MM))
    np.testing.assert_allclose(bright_centroid_lps(untilted), SPHERE_LPS, atol=0.3)
    assert image.GetPixelID() == untilted.GetPixelID()
    # and the model's views are centred on it: the micro view's centre voxel is the sphere
    micro = extract_crops(image, SPHERE_LPS, default_preprocessing())["micro"]
    assert micro[16, 16, 16] > 0.9


def test_a_tilt_beyond_what_a_gantry_does_is_refused(tmp_path) -> None:
    write_tilted_series(tmp_path, 60.0, slices=6)
    with pytest.raises(M3NetInputError, match="60.0 degrees from perpendicular") as caught:
        read_image(tmp_path)
    assert "\n" not in str(caught.value)


def test_a_series_mixing_orientations_is_refused(tmp_path) -> None:
    write_tilted_series(tmp_path / "a", 0.0, slices=4)
    write_tilted_series(tmp_path / "b", 10.0, slices=4)
    folder = tmp_path / "mixed"
    folder.mkdir()
    uid = generate_uid()
    import pydicom

    for number, path in enumerate([*sorted((tmp_path / "a").iterdir())[:2], *sorted((tmp_path / "b").iterdir())[2:]]):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = uid
        dataset.InstanceNumber = number + 1
        dataset.save_as(folder / f"IM{number:04d}.dcm")

    with pytest.raises(M3NetInputError, match="different orientations"):
        read_image(folder)


# --- image files: sheared and degenerate axes, voxel sizes no CT has ---------------------------


def sphere_image(direction: np.ndarray, spacing=(1.5, 1.5, 2.0), size=(44, 40, 30)) -> sitk.Image:
    image = sitk.Image([int(n) for n in size], sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(FIRST_POSITION.tolist())
    image.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")[::-1], axis=-1)  # [z,y,x] (i,j,k)
    points = FIRST_POSITION + (index * np.asarray(spacing)) @ np.asarray(direction).T
    result = sitk.GetImageFromArray(np.round(sphere_hu(points)).astype(np.int16))
    result.CopyInformation(image)
    return result


def test_a_sheared_image_file_is_resampled_too(tmp_path) -> None:
    tilt = np.radians(-25.0)
    sheared = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, np.sin(tilt)], [0.0, 0.0, np.cos(tilt)]])
    path = tmp_path / "sheared.mha"
    sitk.WriteImage(sphere_image(sheared), str(path))

    with pytest.warns(M3NetWarning, match="25.0 degrees"):
        image = read_image(path)

    np.testing.assert_allclose(bright_centroid_lps(image), SPHERE_LPS, atol=0.3)


@pytest.mark.parametrize(
    ("spacing", "message"),
    [((0.001, 0.001, 0.001), "voxel size"), ((1000.0, 1000.0, 1000.0), "voxel size"), ((0.7, 0.7, 0.0005), "0.0005")],
    ids=["micrometres", "metres", "one-axis"],
)
def test_voxel_sizes_no_ct_has_are_one_line_refusals(tmp_path, spacing, message: str) -> None:
    image = sitk.Image([8, 8, 8], sitk.sitkInt16) - 1000
    image.SetSpacing(spacing)
    path = tmp_path / "odd.nrrd"
    sitk.WriteImage(image, str(path))

    with pytest.raises(M3NetInputError, match=message) as caught:
        read_image(path)
    assert "\n" not in str(caught.value) and "millimetres" in str(caught.value)


def test_a_dicom_series_in_micrometres_is_refused_before_any_view_is_made(tmp_path) -> None:
    write_tilted_series(tmp_path, 0.0, step_mm=0.002, pixel_spacing_mm=0.001, slices=4)
    with pytest.raises(M3NetInputError, match="voxel size"):
        read_image(tmp_path)


def test_dependent_axes_are_refused(tmp_path) -> None:
    flat = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1e-9]])  # the third axis is the first
    image = sitk.Image([6, 6, 6], sitk.sitkInt16)
    image.SetDirection(flat.ravel().tolist())
    path = tmp_path / "flat.mha"
    sitk.WriteImage(image, str(path))

    with pytest.raises(M3NetInputError, match="dependent axes|degrees from perpendicular") as caught:
        read_image(path)
    assert "\n" not in str(caught.value)


def test_a_two_slice_slab_warns(tmp_path) -> None:
    write_tilted_series(tmp_path, 0.0, slices=2)
    with pytest.warns(M3NetWarning, match="only 2 slices.*a slab"):
        image = read_image(tmp_path)
    assert image.GetSize()[2] == 2


def test_predict_refuses_a_sheared_image_handed_to_it_directly() -> None:
    """The API takes images from anywhere; a sheared one is named, not read as a plain grid."""
    from m3netcore import Model, predict

    tilt = np.radians(20.0)
    sheared = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, np.sin(tilt)], [0.0, 0.0, np.cos(tilt)]])
    with pytest.raises(M3NetInputError, match="20 degrees from perpendicular"):
        predict(Model.untrained("single-micro"), sphere_image(sheared, size=(8, 8, 8)), [SPHERE_LPS], explain=False)
