"""m3netcore.crops: micro/meso/macro views sampled in physical space around a point.

The issue's "done when": a nodule at a known LPS point is at the centre of every view
whatever the CT's direction matrix and spacing, the same physical scene gives the same
views, and outside the CT is air without the view being shifted.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from m3netcore import extract_crops
from m3netcore.crops import (
    Preprocessing,
    ScaleSpec,
    default_preprocessing,
    normalise_hu,
    sample_scale,
)

SCALES = ("micro", "meso", "macro")
GRID_CENTRE_INDEX = 15.5  # the point is the corner shared by the middle voxels of a 32 grid
# Of the cube the test CTs cover around the nodule: more than the 96 mm macro view's half.
HALF_EXTENT_MM = 52.0
HU_WINDOW = (-1000.0, 400.0)


@pytest.fixture(scope="module")
def scene_image(phantom):
    """``scene_image(scene_name, case)``: a CT of a named scene in one geometry, cached."""
    scenes = {"nodule": phantom.nodule_scene(), "asymmetric": phantom.asymmetric_scene()}
    cache: dict[tuple[str, str], sitk.Image] = {}

    def image(scene_name: str, case: str) -> sitk.Image:
        if (scene_name, case) not in cache:
            spacing, direction_name = phantom.GEOMETRY_CASES[case]
            cache[scene_name, case] = phantom.render(
                scenes[scene_name],
                phantom.NODULE_LPS,
                HALF_EXTENT_MM,
                spacing,
                phantom.DIRECTIONS[direction_name],
                seed=list(phantom.GEOMETRY_CASES).index(case),
            )
        return cache[scene_name, case]

    return image


def scene_on_grid(phantom, scene, spec: ScaleSpec) -> np.ndarray:
    """The scene evaluated exactly at a view's voxel centres, normalised: what a view should show."""
    reference = spec.grid_at(phantom.NODULE_LPS).reference_image()
    hu = scene.hu_at(phantom.voxel_positions(reference).reshape(-1, 3)).reshape(spec.tensor_shape)
    return normalise_hu(hu.astype(np.float32), HU_WINDOW)


def test_default_views_are_24_48_96_mm_on_32_grids() -> None:
    preprocessing = default_preprocessing()

    assert preprocessing.scale_names == SCALES
    for spec, fov, spacing in zip(preprocessing.scales, (24.0, 48.0, 96.0), (0.75, 1.5, 3.0), strict=True):
        assert spec.field_of_view_mm == (fov, fov, fov)
        assert spec.grid == (32, 32, 32)
        assert spec.spacing_mm == pytest.approx((spacing,) * 3)
    assert preprocessing.hu_window == HU_WINDOW
    assert preprocessing.outside_hu == -1000.0


@pytest.mark.parametrize("scale", SCALES)
def test_nodule_is_at_the_centre_of_every_view(phantom, scene_image, geometry_case: str, scale: str) -> None:
    image = scene_image("nodule", geometry_case)

    crops = extract_crops(image, phantom.NODULE_LPS, default_preprocessing())

    crop = crops[scale]
    assert crop.shape == (32, 32, 32)
    assert crop.dtype == np.float32
    assert crop.min() >= 0.0 and crop.max() <= 1.0
    assert crop.max() == pytest.approx(1.0, abs=0.02), "the +1000 HU nodule is missing from the view"
    centroid = phantom.intensity_centroid(crop)  # air is 0, so only the nodule weighs
    np.testing.assert_allclose(centroid, [GRID_CENTRE_INDEX] * 3, atol=0.1)


def test_sample_scale_returns_hu_and_extract_crops_normalises_it(phantom, scene_image) -> None:
    image = scene_image("nodule", "identity-0.6x0.8x2.5mm")
    preprocessing = default_preprocessing()
    micro = preprocessing.scale("micro")

    hu = sample_scale(image, phantom.NODULE_LPS, micro, outside_hu=-1000.0)

    assert hu.shape == micro.tensor_shape and hu.dtype == np.float32
    assert hu[15:17, 15:17, 15:17].min() > 900.0  # the nodule's core at the centre
    assert hu[0, 0, 0] == pytest.approx(-1000.0, abs=1.0)  # air in the corner, 17 mm away
    normalised = extract_crops(image, phantom.NODULE_LPS, preprocessing)["micro"]
    np.testing.assert_allclose(normalised, normalise_hu(hu, HU_WINDOW), atol=1e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_same_scene_gives_the_same_view_in_every_geometry(phantom, scene_image, geometry_case: str, scale: str) -> None:
    """Lung, soft tissue and a marker beside the nodule: a flip or an axis swap would show."""
    preprocessing = default_preprocessing()
    scene = phantom.asymmetric_scene()

    crop = extract_crops(scene_image("asymmetric", geometry_case), phantom.NODULE_LPS, preprocessing)[scale]
    reference = extract_crops(scene_image("asymmetric", phantom.REFERENCE_CASE), phantom.NODULE_LPS, preprocessing)[
        scale
    ]
    truth = scene_on_grid(phantom, scene, preprocessing.scale(scale))

    # Other voxels and interpolation blur the sharp edges a little: < 0.005 on average,
    # < 0.06 at 99% of the voxels, < 0.18 at the nodule's edge in a 3 mm macro voxel.
    # A one-voxel shift of the view differs by > 0.01 on average and > 0.16 at 1% of
    # its voxels; a flip by > 0.04 on average and > 0.5 at 1%.
    difference = np.abs(crop - reference)
    assert difference.mean() < 0.006
    assert np.percentile(difference, 99) < 0.08
    assert difference.max() < 0.25
    assert np.abs(crop - truth).mean() < 0.008


@pytest.mark.parametrize("scale", SCALES)
def test_same_voxels_stored_flipped_give_identical_views(phantom, scene_image, scale: str) -> None:
    """sitk.Flip reverses the storage order and the direction but keeps every voxel in place."""
    image = scene_image("asymmetric", "identity-1mm")
    flipped = sitk.Flip(image, [True, True, False])
    assert flipped.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    preprocessing = default_preprocessing()

    crop = extract_crops(image, phantom.NODULE_LPS, preprocessing)[scale]
    crop_of_flipped = extract_crops(flipped, phantom.NODULE_LPS, preprocessing)[scale]

    np.testing.assert_allclose(crop_of_flipped, crop, atol=1e-5)


def test_view_near_the_edge_is_air_outside_and_not_shifted(phantom, geometry_case: str) -> None:
    """The nodule 7 mm from a face of the CT: the views reach out of it and stay centred."""
    spacing, direction_name = phantom.GEOMETRY_CASES[geometry_case]
    background_hu = -500.0
    nodule = np.asarray(phantom.NODULE_LPS)
    image = phantom.render(
        phantom.nodule_scene(background_hu=background_hu),
        nodule + np.array([30.0, 0.0, 0.0]),
        37.0,
        spacing,
        phantom.DIRECTIONS[direction_name],
        seed=5,
    )
    preprocessing = default_preprocessing()
    background = float(normalise_hu(np.array([background_hu]), HU_WINDOW)[0])

    crops = extract_crops(image, phantom.NODULE_LPS, preprocessing)

    image_spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    size = np.asarray(image.GetSize())
    for spec in preprocessing.scales:
        crop = crops[spec.name]
        positions = phantom.voxel_positions(spec.grid_at(nodule).reference_image())
        index = ((positions - np.asarray(image.GetOrigin())) @ direction) / image_spacing
        # Interpolation and anti-aliasing blocks reach this many CT voxels across the edge.
        margin = np.maximum(1, np.floor(min(spec.spacing_mm) / image_spacing)) + 1
        far_outside = np.any((index < -0.5 - margin) | (index > size - 0.5 + margin), axis=-1)
        well_inside = np.all((index > margin) & (index < size - 1 - margin), axis=-1)
        away_from_nodule = np.linalg.norm(positions - nodule, axis=-1) > 12.0 + 2 * max(spec.spacing_mm)

        if spec.name != "micro":  # the micro view stays inside an oblique CT's larger box
            assert far_outside.sum() > 0, f"{spec.name}: the view should reach outside the CT"
        assert np.all(crop[far_outside] == 0.0), f"{spec.name}: outside the CT must be -1000 HU (0.0)"
        plain_inside = well_inside & away_from_nodule
        assert plain_inside.sum() > 100, f"{spec.name}: the view should cover plenty of the CT"
        np.testing.assert_allclose(crop[plain_inside], background, atol=0.01, err_msg=spec.name)
        nodule_only = np.clip(crop - 0.5, 0.0, None)  # background 0.36, outside 0, nodule 1
        centroid = phantom.intensity_centroid(nodule_only)
        np.testing.assert_allclose(centroid, [GRID_CENTRE_INDEX] * 3, atol=0.1, err_msg=spec.name)


def test_antialias_averages_detail_finer_than_the_view(phantom) -> None:
    """0.5 mm noise of +-500 HU is nearly uniform grey in a 3 mm view, not sampled noise.

    Blocks of 5x5x5 voxels (2.5 mm, the widest odd block within a 3 mm view voxel) average
    125 values: a standard deviation of about 500 / sqrt(125) = 45 HU before interpolation.
    """
    size = 200
    noise = np.random.default_rng(3).choice([-500.0, 500.0], size=(size, size, size))
    image = sitk.GetImageFromArray(noise.astype(np.float32))
    phantom.set_geometry(image, (-50.0, -50.0, -50.0), (0.5, 0.5, 0.5), np.eye(3))
    smooth = ScaleSpec("macro", (96.0, 96.0, 96.0), (32, 32, 32), antialias=True)
    aliased = dataclasses.replace(smooth, antialias=False)
    center = (0.3, -0.2, 0.1)

    smooth_hu = sample_scale(image, center, smooth)[4:-4, 4:-4, 4:-4]  # away from the CT's edge
    aliased_hu = sample_scale(image, center, aliased)[4:-4, 4:-4, 4:-4]

    assert smooth_hu.std() < 50.0
    assert np.abs(smooth_hu).max() < 250.0
    assert aliased_hu.std() > 5 * smooth_hu.std()


@pytest.mark.parametrize(
    ("hu", "expected"),
    [(-1000.0, 0.0), (400.0, 1.0), (-300.0, 0.5), (-3000.0, 0.0), (3000.0, 1.0)],
)
def test_normalise_hu_clips_to_the_window_and_scales_to_unit(hu: float, expected: float) -> None:
    assert normalise_hu(np.array([hu]), HU_WINDOW)[0] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"field_of_view_mm": (24.0, 24.0, 0.0)}, "field_of_view_mm"),
        ({"field_of_view_mm": (24.0, 24.0)}, "field_of_view_mm"),
        ({"grid": (32, 32, 0)}, "grid"),
        ({"grid": (32, 32)}, "grid"),
    ],
)
def test_scale_spec_rejects_bad_values(kwargs: dict, message: str) -> None:
    values = {"name": "micro", "field_of_view_mm": (24.0, 24.0, 24.0), "grid": (32, 32, 32)} | kwargs
    with pytest.raises(ValueError, match=message):
        ScaleSpec(**values)


def test_preprocessing_rejects_bad_values() -> None:
    micro = default_preprocessing().scale("micro")
    with pytest.raises(ValueError, match="at least one scale"):
        Preprocessing(scales=())
    with pytest.raises(ValueError, match="unique"):
        Preprocessing(scales=(micro, micro))
    with pytest.raises(ValueError, match="hu_window"):
        Preprocessing(scales=(micro,), hu_window=(400.0, -1000.0))
    with pytest.raises(KeyError, match="giga"):
        default_preprocessing().scale("giga")


def test_preprocessing_round_trips_through_a_dict() -> None:
    original = Preprocessing(
        scales=(ScaleSpec("micro", (20.0, 22.0, 24.0), (16, 20, 24), antialias=False),),
        hu_window=(-1100.0, 500.0),
        outside_hu=-1024.0,
    )
    assert Preprocessing.from_dict(original.to_dict()) == original
