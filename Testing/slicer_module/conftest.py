"""A headless Slicer on the slicer-core wheel: real MRML scenes for the module's Logic.

Nothing here is a mock: the scene, the module logics, the displayable managers and the
renderer are Slicer's own, from the ``slicer-core`` wheel. Rendering tests need an
offscreen OpenGL (EGL); they are skipped, with the reason, where none can be loaded.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

MODULE_DIR = Path(__file__).resolve().parents[2] / "M3NetSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402
import vtk  # noqa: E402
from M3NetSlicerLib.convert import update_volume_node_from_image  # noqa: E402
from M3NetSlicerLib.headless import HeadlessApplication, rendering_available  # noqa: E402

from m3netcore.data.synthetic import demo_ct  # noqa: E402
from m3netcore.geometry import lps_to_ras  # noqa: E402

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_WARNING)


@pytest.fixture(scope="session")
def chest():
    """The generated chest CT (LPS-aligned, 0.75 x 0.75 x 1.25 mm) and its two nodules ``(label, LPS)``."""
    image, nodules = demo_ct(7)
    return image, [(label, lps) for label, lps, _ in nodules]


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def resampled(image: sitk.Image, direction: np.ndarray, spacing: float, size: tuple[int, int, int]) -> sitk.Image:
    """``image`` resampled onto a grid centred like it, with ``direction`` (LPS) and ``spacing``."""
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    half = (np.asarray(size) - 1) / 2 * spacing
    origin = centre - direction @ half
    reference = sitk.Image(size, sitk.sitkInt16)
    reference.SetSpacing((spacing,) * 3)
    reference.SetDirection(tuple(direction.ravel()))
    reference.SetOrigin(tuple(origin))
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)


@pytest.fixture(scope="session")
def oblique_chest(chest):
    """The chest CT on an oblique grid whose first axis is flipped (determinant -1), 1.5 mm voxels."""
    image, nodules = chest
    direction = rotation(2, 25.0) @ rotation(0, 12.0) @ np.diag([-1.0, 1.0, 1.0])
    return resampled(image, direction, 1.5, (140, 130, 110)), nodules


@pytest.fixture(scope="session")
def small_chest(chest):
    """The chest CT at 2 mm, axis-aligned: small enough to volume-render quickly on a CPU."""
    image, nodules = chest
    return resampled(image, np.eye(3), 2.0, (100, 90, 84)), nodules


@pytest.fixture
def app():
    """A fresh headless Slicer application (scene + module logics); ``slicer.mrmlScene`` points at it."""
    application = HeadlessApplication.create()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = application.scene
    yield application
    slicer.mrmlScene = previous
    application.scene.Clear(True)


def add_volume(scene, image: sitk.Image, name: str = "CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node.SetName(name)
    update_volume_node_from_image(node, image)
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(1500.0, -500.0)
    return node


def add_points(scene, nodules, name: str = "nodules"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    node.SetName(name)
    for label, lps in nodules:
        node.AddControlPoint(*lps_to_ras(lps), label)
    return node


@pytest.fixture(scope="session")
def rendering():
    """Skip unless an offscreen OpenGL render works here (probed in a child process)."""
    available, reason = rendering_available()
    if not available:
        pytest.skip(reason)
    return reason
