"""How results look in Slicer: the heat colour table, slice overlays, 3D surfaces, ROI boxes.

Everything here works on MRML nodes only (no Qt), so the module, the batch script and the
tests share it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer

HEAT_TABLE_NAME = "M3Net heat"
ROLE = "M3Net.Role"  # node attribute naming what an output node is for
SCALE_COLOURS = {"micro": (1.0, 0.85, 0.1), "meso": (1.0, 0.45, 0.0), "macro": (0.2, 0.6, 1.0)}
# The CT in 3D: air and lung transparent, soft tissue faint, bone brighter.
CT_OPACITY = ((-1024.0, 0.0), (-200.0, 0.0), (40.0, 0.03), (300.0, 0.08), (1200.0, 0.25), (3071.0, 0.3))
CT_COLOURS = ((-1024.0, (0.0, 0.0, 0.0)), (40.0, (0.75, 0.55, 0.45)), (400.0, (0.95, 0.9, 0.85)), (3071.0, (1, 1, 1)))


def heat_colour(value: float) -> tuple[float, float, float]:
    """Dark red -> red -> yellow -> white as ``value`` goes 0 -> 1 (the heatmap's colours)."""
    t = float(np.clip(value, 0.0, 1.0))
    return (min(1.0, 0.4 + 1.8 * t), float(np.clip(2.2 * t - 0.6, 0, 1)), float(np.clip(3.0 * t - 2.0, 0, 1)))


def heat_colour_table(scene):
    """The heat colour table node, made once per scene and reused."""
    for node in _nodes_with_role(scene, "colour-table"):
        return node
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(HEAT_TABLE_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    table.SetAttribute(ROLE, "colour-table")
    table.SetHideFromEditors(False)
    for index in range(256):
        r, g, b = heat_colour(index / 255)
        table.SetColor(index, f"{index / 255:.3f}", r, g, b, 1.0)
    scene.AddNode(table)
    return table


def style_heatmap(heatmap_node, colour_table, threshold: float) -> None:
    """Heat colours over [0, 1]; values below ``threshold`` transparent in the slice views."""
    if heatmap_node.GetDisplayNode() is None:
        heatmap_node.CreateDefaultDisplayNodes()
    display = heatmap_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colour_table.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetApplyThreshold(True)
    display.SetAutoThreshold(False)
    display.SetLowerThreshold(float(threshold))
    display.SetUpperThreshold(1.0)
    display.SetInterpolate(True)


def show_in_slice_views(scene, background_node, foreground_node, opacity: float) -> None:
    """CT as background, heatmap as foreground at ``opacity``, in every slice view."""
    for composite in nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetBackgroundVolumeID(background_node.GetID())
        composite.SetForegroundVolumeID(foreground_node.GetID() if foreground_node is not None else None)
        composite.SetForegroundOpacity(float(opacity))


def jump_slice_views(scene, point_ras: Sequence[float]) -> None:
    """Centre every slice view on ``point_ras``."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(
        scene, *[float(v) for v in point_ras], slicer.vtkMRMLSliceNode.CenteredJumpSlice
    )


def show_ct_in_3d(volume_rendering_logic, volume_node):
    """Volume-render the CT with Slicer's default method and a chest transfer function made in code.

    For scenes this program owns (the batch script); the panel never changes the CT's 3D
    display. An existing volume rendering display of the CT is shown as it is. The nodes
    are made without Slicer's presets, which the ``slicer-core`` wheel does not ship.
    """
    for index in range(volume_node.GetNumberOfDisplayNodes()):
        shown = volume_node.GetNthDisplayNode(index)
        if shown is not None and shown.IsA("vtkMRMLVolumeRenderingDisplayNode"):
            shown.SetVisibility(True)
            return shown
    scene = volume_node.GetScene()
    shown = volume_rendering_logic.CreateVolumeRenderingDisplayNode()  # the default method (GPU ray cast)
    scene.AddNode(shown)
    volume_property = slicer.vtkMRMLVolumePropertyNode()
    scene.AddNode(volume_property)
    shown.SetAndObserveVolumePropertyNodeID(volume_property.GetID())
    volume_node.AddAndObserveDisplayNodeID(shown.GetID())
    volume_rendering_logic.UpdateDisplayNodeFromVolumeNode(shown, volume_node)
    set_ct_transfer_functions(volume_property)
    shown.SetVisibility(True)
    return shown


def update_heatmap_surface(scene, model_node, heatmap_node, level: float):
    """The surface where ``heatmap_node`` crosses ``level``, as a model node in RAS (made if None).

    A closed opaque surface drawn by Slicer's standard model renderer: it is depth-sorted
    with whatever else the 3D view shows, so tissue rendered in front of it hides it.
    """
    import vtk

    if model_node is None:
        model_node = slicer.vtkMRMLModelNode()
        scene.AddNode(model_node)
        model_node.CreateDefaultDisplayNodes()
    level = float(np.clip(level, 0.0, 0.99))
    image = heatmap_node.GetImageData()
    polydata = vtk.vtkPolyData()
    if image is not None:
        padded = vtk.vtkImageConstantPad()  # closes surfaces that reach the edge of the field of view
        padded.SetInputData(image)
        extent = image.GetExtent()
        padded.SetOutputWholeExtent(
            extent[0] - 1, extent[1] + 1, extent[2] - 1, extent[3] + 1, extent[4] - 1, extent[5] + 1
        )
        padded.SetConstant(0.0)
        contour = vtk.vtkFlyingEdges3D()
        contour.SetInputConnection(padded.GetOutputPort())
        contour.SetValue(0, max(level, 1e-3))
        contour.ComputeNormalsOn()
        to_ras = vtk.vtkTransform()
        matrix = vtk.vtkMatrix4x4()
        heatmap_node.GetIJKToRASMatrix(matrix)
        to_ras.SetMatrix(matrix)
        transformed = vtk.vtkTransformPolyDataFilter()
        transformed.SetInputConnection(contour.GetOutputPort())
        transformed.SetTransform(to_ras)
        normals = vtk.vtkPolyDataNormals()  # IJK->RAS may flip handedness: recompute outward normals
        normals.SetInputConnection(transformed.GetOutputPort())
        normals.ConsistencyOn()
        normals.AutoOrientNormalsOn()
        normals.Update()
        polydata.DeepCopy(normals.GetOutput())
    model_node.SetAndObservePolyData(polydata)
    if heatmap_node.GetParentTransformNode() is not None:
        model_node.SetAndObserveTransformNodeID(heatmap_node.GetParentTransformNode().GetID())
    shown = model_node.GetDisplayNode()
    shown.SetColor(*heat_colour(min(1.0, level + 0.25)))
    shown.SetOpacity(1.0)
    shown.SetVisibility2D(False)  # the slice views show the heatmap itself
    shown.SetVisibility(True)
    return model_node


def set_ct_transfer_functions(volume_property_node) -> None:
    _set_transfer_functions(volume_property_node, CT_OPACITY, CT_COLOURS)


def update_roi(scene, roi_node, name: str, centre_ras: Sequence[float], size_mm: Sequence[float], colour):
    """An ROI box (made if ``roi_node`` is None) of ``size_mm`` centred on ``centre_ras``."""
    if roi_node is None:
        roi_node = slicer.vtkMRMLMarkupsROINode()
        scene.AddNode(roi_node)
        roi_node.CreateDefaultDisplayNodes()
    roi_node.SetName(name)
    roi_node.SetCenter(*[float(v) for v in centre_ras])
    roi_node.SetSize(*[float(v) for v in size_mm])
    roi_node.SetLocked(True)
    display = roi_node.GetDisplayNode()
    display.SetSelectedColor(*colour)
    display.SetColor(*colour)
    display.SetFillOpacity(0.0)
    display.SetHandlesInteractive(False)
    display.SetPropertiesLabelVisibility(False)
    return roi_node


def _set_transfer_functions(volume_property_node, opacity_points, colour_points) -> None:
    volume_property = volume_property_node.GetVolumeProperty()
    opacity = volume_property.GetScalarOpacity()
    opacity.RemoveAllPoints()
    for value, alpha in opacity_points:
        opacity.AddPoint(float(value), float(alpha))
    colour = volume_property.GetRGBTransferFunction()
    colour.RemoveAllPoints()
    for value, (r, g, b) in colour_points:
        colour.AddRGBPoint(float(value), float(r), float(g), float(b))
    volume_property.SetShade(False)
    volume_property.SetInterpolationTypeToLinear()


def nodes_of_class(scene, class_name: str) -> list:
    nodes = scene.GetNodesByClass(class_name)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def _nodes_with_role(scene, role: str) -> list:
    return [node for node in nodes_of_class(scene, "vtkMRMLNode") if node.GetAttribute(ROLE) == role]
