"""Shared fixtures: small, seeded synthetic CTs in HU drawn in physical (LPS) space.

A scene is a function of the LPS position in mm (air, soft tissue, bright balls with a
smooth edge). An image of a scene is made by evaluating the scene at every voxel's
physical position, so the same scene gives the same anatomy whatever the image's
direction matrix, spacing or origin. That is what lets the tests compare crops taken from
an identity, a flipped and an oblique image of one patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

AIR_HU = -1000.0
LUNG_HU = -850.0
SOFT_TISSUE_HU = 40.0
NODULE_HU = 1000.0

# A point that is not on any voxel centre or lattice of the images below.
NODULE_LPS = (12.3, -20.7, 31.9)
NODULE_RADIUS_MM = 5.0

IDENTITY = np.eye(3)


def rotation_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """A proper rotation about ``axis`` (Rodrigues' formula), for oblique direction matrices."""
    unit = np.asarray(axis, dtype=np.float64)
    unit = unit / np.linalg.norm(unit)
    angle = np.deg2rad(angle_deg)
    cross = np.array([[0.0, -unit[2], unit[1]], [unit[2], 0.0, -unit[0]], [-unit[1], unit[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


DIRECTIONS = {
    "identity": IDENTITY,
    "flip_xy": np.diag([-1.0, -1.0, 1.0]),
    "flip_z": np.diag([1.0, 1.0, -1.0]),
    "oblique": rotation_matrix((1.0, 2.0, 3.0), 30.0),
    # An improper oblique frame (determinant -1): a rotation composed with a flip.
    "oblique_flipped": rotation_matrix((-2.0, 1.0, 1.0), 50.0) @ np.diag([1.0, -1.0, 1.0]),
}

# One physical scene imaged by scanners that differ in direction matrix and spacing:
# name -> (spacing along the image's own axes in mm, direction name).
GEOMETRY_CASES = {
    "identity-1mm": ((1.0, 1.0, 1.0), "identity"),
    "flip_xy-1mm": ((1.0, 1.0, 1.0), "flip_xy"),
    "flip_z-1.25mm": ((1.25, 1.25, 1.25), "flip_z"),
    "identity-0.6x0.8x2.5mm": ((0.6, 0.8, 2.5), "identity"),
    "flip_xy-0.6x0.8x2.5mm": ((0.6, 0.8, 2.5), "flip_xy"),
    "oblique-1.2x1.4x2mm": ((1.2, 1.4, 2.0), "oblique"),
    "oblique_flipped-0.9x1.1x1.7mm": ((0.9, 1.1, 1.7), "oblique_flipped"),
}
REFERENCE_CASE = "identity-1mm"


@dataclass(frozen=True)
class Ball:
    """A ball of ``hu`` with a smooth (logistic) edge ``edge_mm`` wide."""

    center_lps: tuple[float, float, float]
    radius_mm: float
    hu: float
    edge_mm: float = 1.0


@dataclass(frozen=True)
class Scene:
    """Background HU with balls painted over it in order: a CT as a function of LPS mm."""

    background_hu: float = AIR_HU
    balls: tuple[Ball, ...] = field(default_factory=tuple)

    def hu_at(self, points_lps: np.ndarray) -> np.ndarray:
        """HU at ``(N, 3)`` LPS points."""
        values = np.full(points_lps.shape[0], self.background_hu, dtype=np.float64)
        for ball in self.balls:
            distance = np.linalg.norm(points_lps - np.asarray(ball.center_lps), axis=1)
            weight = 0.5 * (1.0 + np.tanh((ball.radius_mm - distance) / ball.edge_mm))
            values = values * (1.0 - weight) + ball.hu * weight
        return values


def nodule_scene(center_lps: Sequence[float] = NODULE_LPS, background_hu: float = AIR_HU) -> Scene:
    """One bright, spherically symmetric nodule: its intensity centroid is its centre."""
    return Scene(background_hu, (Ball(tuple(center_lps), NODULE_RADIUS_MM, NODULE_HU),))


def asymmetric_scene(center_lps: Sequence[float] = NODULE_LPS) -> Scene:
    """The nodule in lung with soft tissue and a marker on one side: a flip or axis swap shows."""
    c = np.asarray(center_lps, dtype=np.float64)

    def at(offset: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(v) for v in c + np.asarray(offset))

    return Scene(
        AIR_HU,
        (
            Ball(at((0.0, 0.0, 0.0)), 60.0, LUNG_HU, edge_mm=3.0),
            Ball(at((30.0, -18.0, 10.0)), 22.0, SOFT_TISSUE_HU, edge_mm=3.0),
            Ball(at((0.0, 0.0, 0.0)), NODULE_RADIUS_MM, NODULE_HU, edge_mm=1.5),
            Ball(at((6.0, 3.0, -4.0)), 2.5, 300.0, edge_mm=1.5),
            Ball(at((-14.0, 9.0, 6.0)), 6.0, SOFT_TISSUE_HU, edge_mm=2.0),
        ),
    )


def voxel_positions(image: sitk.Image) -> np.ndarray:
    """LPS position of every voxel, ``(z, y, x, 3)`` like the numpy array of ``image``."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    return np.asarray(image.GetOrigin()) + (index * spacing) @ direction.T


def physical_center(image: sitk.Image) -> np.ndarray:
    """LPS position of the image's centre: origin + direction @ ((size - 1) / 2 * spacing)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    half = (np.asarray(image.GetSize(), dtype=np.float64) - 1.0) / 2.0 * np.asarray(image.GetSpacing())
    return np.asarray(image.GetOrigin()) + direction @ half


def render(
    scene: Scene,
    center_lps: Sequence[float],
    half_extent_mm: float,
    spacing_mm: Sequence[float],
    direction: np.ndarray = IDENTITY,
    *,
    dtype: type = np.float32,
    seed: int = 0,
) -> sitk.Image:
    """An image of ``scene`` whose voxels cover the LPS cube ``center +- half_extent_mm``.

    The image's own axes follow ``direction`` (so an oblique image is larger than the
    cube); its origin is moved by a seeded fraction of a voxel so that no voxel centre
    falls on a round coordinate. Integer ``dtype`` rounds the HU.
    """
    direction = np.asarray(direction, dtype=np.float64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    center = np.asarray(center_lps, dtype=np.float64)
    corners = np.array([center + half_extent_mm * (2 * np.array(c) - 1) for c in np.ndindex(2, 2, 2)])
    local = corners @ direction  # the corners along the image's own axes
    jitter = np.random.default_rng(seed).uniform(0.1, 0.9, size=3) * spacing
    low = local.min(axis=0) - jitter
    size = np.ceil((local.max(axis=0) - low) / spacing).astype(int) + 1
    geometry = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    set_geometry(geometry, direction @ low, spacing, direction)
    hu = scene.hu_at(voxel_positions(geometry).reshape(-1, 3)).reshape(tuple(size[::-1]))
    if np.issubdtype(dtype, np.integer):
        hu = np.round(hu)
    image = sitk.GetImageFromArray(hu.astype(dtype))
    image.CopyInformation(geometry)
    return image


def set_geometry(
    image: sitk.Image, origin: Sequence[float], spacing: Sequence[float], direction: np.ndarray
) -> sitk.Image:
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    return image


def intensity_centroid(array: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid of a ``[z, y, x]`` array, in (continuous) array indices."""
    weights = np.asarray(array, dtype=np.float64)
    total = weights.sum()
    if total <= 0:
        raise ValueError("no positive intensity to take a centroid of")
    indices = np.indices(weights.shape).reshape(3, -1)
    return (indices * weights.reshape(-1)).sum(axis=1) / total


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same random state."""
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_ct() -> sitk.Image:
    """A 65^3 CT at 1.6 mm (104 mm, more than the 96 mm macro view) around :data:`NODULE_LPS`.

    int16 HU: air outside a lung, soft tissue on one side, a bright nodule at the point.
    """
    return render(asymmetric_scene(), NODULE_LPS, 50.4, (1.6, 1.6, 1.6), dtype=np.int16, seed=1)


@pytest.fixture(scope="session")
def phantom() -> SimpleNamespace:
    """The helpers of this file for tests (a conftest is not imported by name)."""
    return SimpleNamespace(
        AIR_HU=AIR_HU,
        LUNG_HU=LUNG_HU,
        SOFT_TISSUE_HU=SOFT_TISSUE_HU,
        NODULE_HU=NODULE_HU,
        NODULE_LPS=NODULE_LPS,
        NODULE_RADIUS_MM=NODULE_RADIUS_MM,
        DIRECTIONS=DIRECTIONS,
        GEOMETRY_CASES=GEOMETRY_CASES,
        REFERENCE_CASE=REFERENCE_CASE,
        Ball=Ball,
        Scene=Scene,
        nodule_scene=nodule_scene,
        asymmetric_scene=asymmetric_scene,
        render=render,
        rotation_matrix=rotation_matrix,
        voxel_positions=voxel_positions,
        physical_center=physical_center,
        set_geometry=set_geometry,
        intensity_centroid=intensity_centroid,
    )


@pytest.fixture(params=list(GEOMETRY_CASES))
def geometry_case(request: pytest.FixtureRequest) -> str:
    """Each scanner geometry of :data:`GEOMETRY_CASES`, by name."""
    return request.param


@pytest.fixture(scope="session")
def untrained_model_file(tmp_path_factory: pytest.TempPathFactory):
    """A valid model file of a seeded, untrained M3Net (no bundled model is needed)."""
    import m3netcore

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m3net-untrained.safetensors"
    m3netcore.save_model(m3netcore.Model.untrained("m3net"), path)
    return path
