"""A headless Slicer on the slicer-core wheel: real MRML scenes for the module's Logic.

Nothing here is a mock: the scene, the module logics, the displayable managers and the
renderer are Slicer's own, from the ``slicer-core`` wheel. Rendering tests need an
offscreen OpenGL (EGL); they are skipped, with the reason, where none can be loaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from M3NetSlicerLib.headless import HeadlessApplication, rendering_available
from mrml_helpers import resampled, rotation

from m3netcore.data.synthetic import demo_ct

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_WARNING)


@pytest.fixture(scope="session")
def chest():
    """The generated chest CT (LPS-aligned, 0.75 x 0.75 x 1.25 mm) and its two nodules ``(label, LPS)``."""
    image, nodules = demo_ct(7)
    return image, [(label, lps) for label, lps, _ in nodules]


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


@pytest.fixture(scope="session")
def rendering():
    """Skip unless an offscreen OpenGL render works here (probed in a child process)."""
    available, reason = rendering_available()
    if not available:
        pytest.skip(reason)
    return reason
