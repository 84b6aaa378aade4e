"""Helpers of the Slicer module's tests (a module of its own: ``conftest`` names clash across folders)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from M3NetSlicerLib.convert import update_volume_node_from_image

from m3netcore.geometry import lps_to_ras

MODULE_DIR = Path(__file__).resolve().parents[2] / "M3NetSlicer"  # on sys.path via pytest.ini


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


def heat_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels in the heat colours (red to yellow); the CT is grey, so these come from a heatmap."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > 120) & (r - b > 70) & (r >= g)
