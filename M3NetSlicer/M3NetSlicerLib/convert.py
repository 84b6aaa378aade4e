"""MRML <-> SimpleITK at the edge: Slicer's world is RAS, the core's is LPS.

A scalar volume node is IJK voxels plus an IJKToRAS matrix (and possibly a parent
transform). The core takes a SimpleITK image: the same voxels with LPS origin, spacing and
direction. Converting here, once, keeps the rest of the module free of coordinate flips.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from m3netcore.errors import M3NetInputError
from m3netcore.geometry import to_lps
from m3netcore.io import check_image

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """The 4x4 IJK -> world RAS matrix of ``volume_node``, parent transforms included.

    Raises:
        M3NetInputError: the volume is under a non-linear transform (harden it first).
    """
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _array_from_matrix(matrix)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise M3NetInputError(
                f"volume {volume_node.GetName()!r} is under a non-linear transform; harden the transform first"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _array_from_matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def image_from_volume_node(volume_node) -> sitk.Image:
    """The volume node as a SimpleITK image in LPS (same voxels; values copied as stored).

    Raises:
        M3NetInputError: no voxels, not a single-component 3D volume, or a sheared grid.
    """
    if volume_node is None:
        raise M3NetInputError("no input volume selected")
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise M3NetInputError(f"volume {volume_node.GetName()!r} has no voxels")
    dims = image_data.GetDimensions()
    components = image_data.GetNumberOfScalarComponents()
    voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    shape = dims[::-1] if components == 1 else (*dims[::-1], components)
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.reshape(shape)), isVector=components > 1)
    check_image(image, f"volume {volume_node.GetName()!r}")  # one 3D scalar volume, as the core requires
    origin, spacing, direction = _lps_geometry(world_ijk_to_ras(volume_node), volume_node.GetName())
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def update_volume_node_from_image(volume_node, image: sitk.Image) -> None:
    """Give ``volume_node`` the voxels and geometry of the LPS image ``image`` (in place)."""
    voxels = sitk.GetArrayFromImage(image)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*image.GetSize())
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    volume_node.SetIJKToRASMatrix(_matrix_from_array(ijk_to_ras_of_image(image)))
    volume_node.SetAndObserveImageData(image_data)


def ijk_to_ras_of_image(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK -> RAS matrix of a SimpleITK (LPS) image."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = RAS_FROM_LPS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = RAS_FROM_LPS @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def ras_to_lps(point_ras) -> tuple[float, float, float]:
    return tuple(float(v) for v in to_lps([point_ras], "RAS")[0])


def control_points(points_node) -> list[tuple[str, tuple[float, float, float]]]:
    """``(label, world LPS)`` of each control point that has a position, in order.

    Raises:
        M3NetInputError: no point list, or no placed points in it.
    """
    if points_node is None:
        raise M3NetInputError("no nodule points: place a point on the nodule or choose a point list")
    points = []
    position = [0.0, 0.0, 0.0]
    for index in range(points_node.GetNumberOfControlPoints()):
        if points_node.GetNthControlPointPositionStatus(index) != points_node.PositionDefined:
            continue
        points_node.GetNthControlPointPositionWorld(index, position)
        label = points_node.GetNthControlPointLabel(index) or f"{points_node.GetName()}-{index + 1}"
        points.append((label, ras_to_lps(position)))
    if not points:
        raise M3NetInputError(f"point list {points_node.GetName()!r} has no placed points")
    return points


def _lps_geometry(ijk_to_ras: np.ndarray, name: str):
    columns = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(spacing > 0):
        raise M3NetInputError(f"volume {name!r} has a zero voxel spacing")
    direction_ras = columns / spacing
    if not np.allclose(direction_ras.T @ direction_ras, np.eye(3), atol=1e-4):
        raise M3NetInputError(f"volume {name!r} has a sheared voxel grid; resample it to an orthogonal grid first")
    direction_lps = RAS_FROM_LPS @ direction_ras
    origin_lps = RAS_FROM_LPS @ ijk_to_ras[:3, 3]
    return tuple(origin_lps.tolist()), tuple(spacing.tolist()), tuple(direction_lps.ravel().tolist())


def _array_from_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _matrix_from_array(array: np.ndarray):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix
