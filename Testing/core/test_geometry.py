"""m3netcore.geometry: LPS/RAS points, crop grids, inside/outside checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from m3netcore.errors import M3NetInputError
from m3netcore.geometry import (
    CropGrid,
    array_from_image,
    check_inside,
    contains_point,
    image_from_array,
    lps_to_ras,
    physical_bounds,
    to_lps,
)


def test_to_lps_keeps_lps_points() -> None:
    points = to_lps([(1.5, -2.0, 3.25), (0.0, 4.0, -5.0)], "LPS")
    np.testing.assert_array_equal(points, [[1.5, -2.0, 3.25], [0.0, 4.0, -5.0]])
    assert points.dtype == np.float64


@pytest.mark.parametrize("coords", ["RAS", "ras", "Ras"])
def test_to_lps_negates_x_and_y_of_ras(coords: str) -> None:
    points = to_lps([(1.5, -2.0, 3.25)], coords)
    np.testing.assert_array_equal(points, [[-1.5, 2.0, 3.25]])


def test_lps_to_ras_is_its_own_inverse() -> None:
    point = (12.5, -7.25, 30.0)
    assert lps_to_ras(point) == (-12.5, 7.25, 30.0)
    assert lps_to_ras(lps_to_ras(point)) == point
    np.testing.assert_array_equal(to_lps([lps_to_ras(point)], "RAS")[0], point)


@pytest.mark.parametrize(
    ("points", "coords", "message"),
    [
        ([(0.0, 0.0, 0.0)], "IJK", "coords must be"),
        ([], "LPS", "no points"),
        ([(1.0, 2.0)], "LPS", "exactly 3 coordinates"),
        ([(1.0, 2.0, 3.0, 4.0)], "LPS", "exactly 3 coordinates"),
        ([(1.0, math.nan, 3.0)], "LPS", "NaN or infinite"),
        ([(1.0, 2.0, math.inf)], "RAS", "NaN or infinite"),
        ([("a", "b", "c")], "LPS", "must be (x, y, z) numbers"),
        ((1.0, 2.0, 3.0), "LPS", "must be (x, y, z) numbers"),  # one point, not a list of points
    ],
)
def test_to_lps_rejects_bad_points(points: object, coords: str, message: str) -> None:
    with pytest.raises(M3NetInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_lps(points, coords)


@pytest.mark.parametrize("size", [(32, 32, 32), (31, 20, 9)])
def test_crop_grid_is_centred_on_its_point(phantom, size: tuple[int, int, int]) -> None:
    center = (10.3, -4.2, 77.7)
    spacing = (0.75, 1.5, 3.0)
    grid = CropGrid(center_lps=center, size=size, spacing_mm=spacing)
    reference = grid.reference_image()

    assert reference.GetSize() == size
    assert reference.GetSpacing() == spacing
    assert reference.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    np.testing.assert_allclose(phantom.physical_center(reference), center, atol=1e-9)
    np.testing.assert_allclose(grid.field_of_view_mm, np.asarray(size) * spacing)


def test_physical_bounds_span_voxel_edges_for_any_direction(phantom) -> None:
    image = sitk.Image([10, 20, 5], sitk.sitkInt16)
    phantom.set_geometry(image, (100.0, 50.0, -20.0), (1.0, 0.5, 2.0), phantom.DIRECTIONS["flip_xy"])

    low, high = physical_bounds(image)

    # x runs from 100 towards -x: voxel centres 100 .. 91, edges 100.5 .. 90.5.
    np.testing.assert_allclose(low, [90.5, 40.25, -21.0])
    np.testing.assert_allclose(high, [100.5, 50.25, -11.0])


@pytest.mark.parametrize("direction_name", ["identity", "flip_xy", "flip_z", "oblique"])
def test_contains_point_includes_edges_and_excludes_beyond(phantom, direction_name: str) -> None:
    image = sitk.Image([8, 6, 4], sitk.sitkInt16)
    phantom.set_geometry(image, (-3.0, 7.0, 11.0), (0.7, 0.9, 2.5), phantom.DIRECTIONS[direction_name])

    def at(index: tuple[float, float, float]) -> tuple[float, ...]:
        return image.TransformContinuousIndexToPhysicalPoint(index)

    assert contains_point(image, at((0.0, 0.0, 0.0)))
    # The voxels' outer edges count as inside (a click on the first or last voxel works).
    assert contains_point(image, at((-0.49, -0.49, -0.49)))
    assert contains_point(image, at((7.49, 5.49, 3.49)))
    assert not contains_point(image, at((-0.51, 2.0, 1.0)))
    assert not contains_point(image, at((3.0, 5.51, 1.0)))
    assert not contains_point(image, at((3.0, 2.0, 3.51)))


def test_check_inside_names_the_point_and_the_image_extent(phantom) -> None:
    image = sitk.Image([8, 8, 8], sitk.sitkInt16)
    phantom.set_geometry(image, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), np.eye(3))

    check_inside(image, (3.0, 3.0, 3.0))  # inside: no error
    with pytest.raises(M3NetInputError, match="outside the image") as caught:
        check_inside(image, (50.0, 3.0, 3.0))
    message = str(caught.value)
    assert "LPS (50.0, 3.0, 3.0)" in message
    assert "RAS (-50.0, -3.0, 3.0)" in message
    assert "x -0.5..7.5" in message


def test_image_from_array_puts_array_on_grid_and_back() -> None:
    grid = CropGrid(center_lps=(1.0, 2.0, 3.0), size=(4, 3, 2), spacing_mm=(1.0, 2.0, 3.0))
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # [z, y, x]

    image = image_from_array(array, grid)

    assert image.GetSize() == (4, 3, 2)
    assert image.GetOrigin() == pytest.approx(grid.origin_lps)
    # [z, y, x] in numpy is (x, y, z) in SimpleITK.
    assert image.GetPixel(3, 0, 1) == array[1, 0, 3]
    np.testing.assert_array_equal(array_from_image(image), array)


def test_image_from_array_rejects_a_shape_that_does_not_fit_the_grid() -> None:
    grid = CropGrid(center_lps=(0.0, 0.0, 0.0), size=(4, 3, 2), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="does not match grid size"):
        image_from_array(np.zeros((4, 3, 2), dtype=np.float32), grid)
