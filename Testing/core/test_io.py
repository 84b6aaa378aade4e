"""m3netcore.io.read_image: image files and DICOM series in HU, geometry untouched."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from ct_dicom import write_ct_slice
from pydicom.uid import generate_uid

from m3netcore import M3NetInputError, M3NetWarning, read_image
from m3netcore.io import SERIES_UID_TAG, series_uid_of

ORIGIN = (-10.5, 20.25, -100.0)
SPACING = (0.7, 0.8, 2.5)

# How exactly each format keeps the geometry. MetaImage writes doubles in full; NRRD
# writes the direction scaled by the spacing and divides it back (1 ulp); NIfTI stores
# its affine in float32.
GEOMETRY_TOLERANCE = {".mha": 0.0, ".mhd": 0.0, ".nrrd": 1e-12, ".nii.gz": 1e-6}


def random_hu(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU from air to dense bone, ``[z, y, x]``."""
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    origin: Sequence[float],
    spacing: Sequence[float],
    direction: np.ndarray,
    series_uid: str,
    reverse_files: bool = False,
    skip_slices: Sequence[int] = (),
) -> None:
    """Write ``hu`` (``[z, y, x]``) as a CT Image Storage series with pydicom.

    Slice ``k`` lies at ``origin + k * spacing[2] * normal`` with rows along the first
    column of ``direction`` and columns along the second, stored as int16 with
    RescaleIntercept -1024. ``reverse_files`` numbers the files from the last slice down.
    """
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(direction, dtype=np.float64)
    slices = list(range(hu.shape[0]))
    if reverse_files:
        slices.reverse()
    for instance, k in enumerate(slices, start=1):
        if k in skip_slices:
            continue
        write_ct_slice(
            folder / f"IM{instance:04d}.dcm",
            hu[k],
            position=np.asarray(origin) + k * spacing[2] * direction[:, 2],
            orientation=(*direction[:, 0], *direction[:, 1]),
            pixel_spacing=(spacing[1], spacing[0]),  # row spacing (y), column spacing (x)
            slice_thickness=spacing[2],
            patient_id="PHANTOM",
            study_uid="1.2.826.0.1.3680043.8.498.10",
            series_uid=series_uid,
            instance=instance,
        )


# --- image files -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(GEOMETRY_TOLERANCE))
@pytest.mark.parametrize("direction_name", ["identity", "flip_xy", "oblique"])
def test_image_file_round_trip_keeps_geometry_and_voxels(tmp_path, phantom, suffix: str, direction_name: str) -> None:
    hu = random_hu((6, 10, 12))
    written = sitk.GetImageFromArray(hu)
    phantom.set_geometry(written, ORIGIN, SPACING, phantom.DIRECTIONS[direction_name])
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(written, str(path))

    image = read_image(path)

    tolerance = GEOMETRY_TOLERANCE[suffix]
    assert image.GetSize() == (12, 10, 6)
    np.testing.assert_allclose(image.GetSpacing(), SPACING, rtol=0, atol=tolerance)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, rtol=0, atol=tolerance * 100)
    np.testing.assert_allclose(image.GetDirection(), written.GetDirection(), rtol=0, atol=tolerance)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_metaimage_keeps_an_oblique_geometry_exactly(tmp_path, phantom, suffix: str) -> None:
    written = sitk.GetImageFromArray(random_hu((4, 5, 6)))
    phantom.set_geometry(written, (-10.3, 20.7, -100.1), (0.71, 0.83, 2.5), phantom.DIRECTIONS["oblique"])
    sitk.WriteImage(written, str(tmp_path / f"ct{suffix}"))

    image = read_image(tmp_path / f"ct{suffix}")

    assert image.GetSpacing() == written.GetSpacing()
    assert image.GetOrigin() == written.GetOrigin()
    assert image.GetDirection() == written.GetDirection()


def test_series_uid_of_a_luna16_style_file_is_its_name(tmp_path) -> None:
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    path = tmp_path / f"{uid}.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(random_hu((3, 4, 5))), str(path))

    image = read_image(path)

    assert series_uid_of(image, path) == uid
    assert series_uid_of(image) is None
    # Only a UID-shaped .mhd/.mha name is taken for a series UID, never a "ct.nrrd".
    assert series_uid_of(image, tmp_path / "ct.nrrd") is None
    assert series_uid_of(image, tmp_path / "ct.mhd") is None
    assert series_uid_of(image, tmp_path / f"{uid}.nrrd") is None


def write_image(path: Path, image: sitk.Image) -> Path:
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: write_image(d / "slice.nrrd", sitk.Image([16, 16], sitk.sitkInt16)), "2D image"),
        (lambda d: write_image(d / "time.nrrd", sitk.Image([8, 8, 8, 3], sitk.sitkInt16)), "4D image"),
        (lambda d: write_image(d / "rgb.mha", sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3)), "RGB or vector"),
        (lambda d: write_image(d / "one.nrrd", sitk.Image([8, 8, 1], sitk.sitkInt16)), "single slice"),
        (lambda d: d / "missing.nrrd", "no such file or folder"),
        (lambda d: (d / "text.nrrd").write_text("not an image") and d / "text.nrrd", "cannot read"),
    ],
    ids=["2d", "4d", "rgb", "single-slice", "missing", "not-an-image"],
)
def test_what_is_not_one_3d_scalar_volume_is_an_input_error(tmp_path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(M3NetInputError, match=message) as caught:
        read_image(path)
    assert "\n" not in str(caught.value)  # one line a user can act on


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_single_frame_4d_image_is_read_as_3d(tmp_path, suffix: str) -> None:
    """A 3D volume stored as one time point is a CT; SimpleITK reads it as 4D."""
    hu = random_hu((1, 8, 10, 12))
    path = write_image(tmp_path / f"single-frame{suffix}", sitk.GetImageFromArray(hu, isVector=False))
    assert sitk.ReadImage(str(path)).GetDimension() == 4

    image = read_image(path)

    assert image.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu[0])


def test_series_uid_applies_to_folders_only(tmp_path) -> None:
    path = write_image(tmp_path / "ct.mha", sitk.GetImageFromArray(random_hu((3, 4, 5))))
    with pytest.raises(M3NetInputError, match="DICOM folders only"):
        read_image(path, series_uid="1.2.3")


# --- Hounsfield units ------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).random((8, 8, 8)).astype(np.float32),  # normalised to [0, 1]
        np.random.default_rng(2).integers(0, 256, size=(8, 8, 8)).astype(np.uint8),  # 8-bit grey
    ],
    ids=["unit-float", "uint8"],
)
def test_image_not_in_hounsfield_units_warns(tmp_path, values: np.ndarray) -> None:
    path = write_image(tmp_path / "normalised.nrrd", sitk.GetImageFromArray(values))
    with pytest.warns(M3NetWarning, match="Hounsfield"):
        image = read_image(path)
    assert image.GetSize() == (8, 8, 8)  # a warning, not an error


def test_ct_in_hounsfield_units_does_not_warn(tmp_path, small_ct) -> None:
    path = write_image(tmp_path / "ct.nrrd", small_ct)
    with warnings.catch_warnings():
        warnings.simplefilter("error", M3NetWarning)
        read_image(path)


# --- DICOM series ------------------------------------------------------------------------

DICOM_ORIENTATIONS = {
    "axial": np.eye(3),
    # rows to the right (-x), columns to posterior: the slice normal points to the feet, so
    # z descends along the series.
    "descending-z": np.diag([-1.0, 1.0, -1.0]),
    "oblique": None,  # filled from the phantom's oblique direction
}


@pytest.mark.parametrize("reverse_files", [False, True], ids=["files-ascending", "files-descending"])
@pytest.mark.parametrize("orientation", list(DICOM_ORIENTATIONS))
def test_dicom_series_reads_with_its_geometry_and_hu(tmp_path, phantom, orientation: str, reverse_files: bool) -> None:
    direction = DICOM_ORIENTATIONS[orientation]
    if direction is None:
        direction = phantom.DIRECTIONS["oblique"]
    hu = random_hu((6, 10, 12))
    uid = generate_uid()
    write_ct_series(
        tmp_path, hu, origin=ORIGIN, spacing=SPACING, direction=direction, series_uid=uid, reverse_files=reverse_files
    )

    image = read_image(tmp_path)

    assert image.GetSize() == (12, 10, 6)
    # DICOM stores positions and orientations as decimal strings (6 and 10 digits here).
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(np.asarray(image.GetDirection()).reshape(3, 3), direction, atol=1e-7)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)  # HU after the rescale
    assert image.GetMetaData(SERIES_UID_TAG) == uid
    assert series_uid_of(image, tmp_path) == uid


def test_dicom_folder_with_two_series_needs_a_uid(tmp_path, phantom) -> None:
    first_uid, second_uid = generate_uid(), generate_uid()
    first_hu, second_hu = random_hu((4, 6, 8), seed=1), random_hu((5, 6, 8), seed=2)
    write_ct_series(tmp_path / "a", first_hu, origin=ORIGIN, spacing=SPACING, direction=np.eye(3), series_uid=first_uid)
    write_ct_series(
        tmp_path / "b", second_hu, origin=ORIGIN, spacing=SPACING, direction=np.eye(3), series_uid=second_uid
    )
    folder = tmp_path / "both"
    folder.mkdir()
    for path in [*sorted((tmp_path / "a").iterdir()), *sorted((tmp_path / "b").iterdir())]:
        path.rename(folder / f"{path.parent.name}-{path.name}")

    with pytest.raises(M3NetInputError, match="2 DICOM series") as caught:
        read_image(folder)
    assert first_uid in str(caught.value) and second_uid in str(caught.value)

    first = read_image(folder, series_uid=first_uid)
    second = read_image(folder, series_uid=second_uid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(first), first_hu)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(second), second_hu)
    assert first.GetMetaData(SERIES_UID_TAG) == first_uid
    assert second.GetMetaData(SERIES_UID_TAG) == second_uid

    with pytest.raises(M3NetInputError, match="not in"):
        read_image(folder, series_uid="1.2.3.4")


@pytest.mark.parametrize("missing_slice", [1, 3])
def test_dicom_series_with_a_missing_slice_is_an_input_error(tmp_path, missing_slice: int) -> None:
    write_ct_series(
        tmp_path,
        random_hu((6, 6, 8)),
        origin=ORIGIN,
        spacing=SPACING,
        direction=np.eye(3),
        series_uid=generate_uid(),
        skip_slices=(missing_slice,),
    )
    with pytest.raises(M3NetInputError, match="unevenly spaced"):
        read_image(tmp_path)


def test_folder_without_dicom_is_an_input_error(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(M3NetInputError, match="no DICOM series"):
        read_image(tmp_path)


def test_folder_with_a_single_slice_is_not_a_volume(tmp_path) -> None:
    write_ct_series(
        tmp_path, random_hu((1, 6, 8)), origin=ORIGIN, spacing=SPACING, direction=np.eye(3), series_uid=generate_uid()
    )
    with pytest.raises(M3NetInputError, match="single slice, not a 3D volume"):
        read_image(tmp_path)
