"""M3Net's output nodes in a scene: how they are tagged, found, shown and found again.

Every output node (results table, heatmap volumes, 3D heatmap surfaces, field-of-view
boxes) carries attributes: its role, the ID of the input volume it belongs to, and where
it applies the nodule number and scale. They live in the subject hierarchy in a folder
*M3Net* under the input volume. Because the attributes are saved with the scene, a scene
that is saved, closed and opened again (on this computer or another) gives back the same
results (:func:`restore`) without running the network again.

This module needs neither torch nor Qt: the panel uses it when the module opens or a
scene loads, before anything heavy is imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import slicer

from M3NetSlicerLib import display

INPUT = "M3Net.Input"  # attribute: the ID of the input volume an output belongs to
NUMBER = "M3Net.Nodule"  # attribute: 1-based nodule number
SCALE = "M3Net.Scale"  # attribute: "combined" or a scale name
FIELDS_OF_VIEW = "M3Net.FieldsOfViewMm"  # attribute of a heatmap node: JSON {scale: [x, y, z]}
SURFACE_OF = "M3Net.SurfaceOf"  # attribute of a surface: the level and heatmap voxels it was made from
ROLE = display.ROLE
FOLDER_NAME = "M3Net"
OUTPUT_ROLES = ("results-table", "heatmap", "heatmap-surface", "fov-roi")
TABLE_COLUMNS = (
    "label",
    "probability",
    "prediction",
    "attention_micro",
    "attention_meso",
    "attention_macro",
    "R",
    "A",
    "S",
    "model",
    "model_version",
    "device",
)


@dataclass
class NoduleOutput:
    """One nodule's answer and the nodes that show it.

    ``result`` is the core's ``NoduleResult`` right after a run, and ``None`` when the
    output was found again in a loaded scene; the other fields are there in both cases.
    """

    number: int
    label: str
    probability: float
    prediction: str
    scale_attention: dict[str, float] | None
    point_ras: tuple[float, float, float]
    fields_of_view_mm: dict[str, tuple[float, float, float]]
    heatmap_nodes: dict[str, object] = field(default_factory=dict)  # "combined" and, on request, each scale
    result: object = None


@dataclass
class RunOutput:
    """What one Apply produced (or what a loaded scene holds of it)."""

    volume_node: object
    table_node: object
    nodules: list[NoduleOutput]
    device: str
    seconds: float = 0.0


# -- tagging and finding --------------------------------------------------------------------


def is_output(node) -> bool:
    """Whether ``node`` is one of M3Net's outputs (never offered as an input)."""
    return node is not None and node.GetAttribute(ROLE) in OUTPUT_ROLES


def output_folder(scene, volume_node) -> int:
    """The subject hierarchy folder *M3Net* under ``volume_node`` (made if missing)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    if not volume_item:
        volume_item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), volume_node)
    folder = hierarchy.GetItemChildWithName(volume_item, FOLDER_NAME)
    if not folder:
        folder = hierarchy.CreateFolderItem(volume_item, FOLDER_NAME)
    return folder


def tag(scene, node, role: str, input_id: str, folder: int, *, number=None, scale=None) -> None:
    """Mark ``node`` as output ``role`` of the input ``input_id`` and file it under ``folder``."""
    node.SetAttribute(ROLE, role)
    node.SetAttribute(INPUT, input_id)
    if number is not None:
        node.SetAttribute(NUMBER, str(number))
    if scale is not None:
        node.SetAttribute(SCALE, scale)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        hierarchy.CreateItem(folder, node)
    elif hierarchy.GetItemParent(item) != folder:
        hierarchy.SetItemParent(item, folder)


def outputs(scene, input_id: str, role: str | None = None) -> list:
    """The output nodes of the input volume with ID ``input_id`` (of one role, if given)."""
    return [
        node
        for node in display.nodes_of_class(scene, "vtkMRMLNode")
        if node.GetAttribute(INPUT) == input_id and (role is None or node.GetAttribute(ROLE) == role)
    ]


def find(scene, input_id: str, role: str, *, number=None, scale=None):
    """The first output of ``role`` (and nodule ``number``, ``scale``) of ``input_id``, or None."""
    for node in outputs(scene, input_id, role):
        if number is not None and node.GetAttribute(NUMBER) != str(number):
            continue
        if scale is not None and node.GetAttribute(SCALE) != scale:
            continue
        return node
    return None


def remove_node(scene, node) -> None:
    """Remove ``node``, its display and storage nodes and its subject hierarchy item."""
    for index in reversed(range(node.GetNumberOfDisplayNodes())):
        shown = node.GetNthDisplayNode(index)
        if shown is not None:
            scene.RemoveNode(shown)
    if node.IsA("vtkMRMLStorableNode") and node.GetStorageNode() is not None:
        scene.RemoveNode(node.GetStorageNode())  # nodes loaded from a saved scene have one
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.RemoveItem(item, False, False)
    scene.RemoveNode(node)


def remove_stale(scene, input_id: str, keep: set[str], roles: Sequence[str]) -> None:
    """Remove the outputs of ``roles`` whose IDs are not in ``keep`` (left over from a larger run)."""
    for role in roles:
        for node in outputs(scene, input_id, role):
            if node.GetID() not in keep:
                remove_node(scene, node)


# -- showing ----------------------------------------------------------------------------------


def show_nodule(
    scene,
    output: RunOutput,
    index: int,
    *,
    opacity: float = 0.5,
    threshold: float = 0.2,
    scale: str = "combined",
    surfaces: bool = True,
) -> None:
    """Show nodule ``index``: heatmap over the CT, slice views on it, its three fields of view.

    In 3D every nodule's combined heatmap is a surface at ``threshold`` (``surfaces``);
    the CT's own 3D display is left as the user set it.
    """
    nodule = output.nodules[index]
    heatmap = nodule.heatmap_nodes.get(scale) or nodule.heatmap_nodes.get("combined")
    set_heatmap_style(scene, output, opacity=opacity, threshold=threshold, surfaces=surfaces)
    display.show_in_slice_views(scene, output.volume_node, heatmap, opacity)
    display.jump_slice_views(scene, nodule.point_ras)
    input_id = output.volume_node.GetID()
    folder = output_folder(scene, output.volume_node)
    for name, fov in nodule.fields_of_view_mm.items():
        roi = display.update_roi(
            scene,
            find(scene, input_id, "fov-roi", scale=name),
            f"M3Net {name} field of view",
            nodule.point_ras,
            fov,
            display.SCALE_COLOURS.get(name, (1, 1, 1)),
        )
        tag(scene, roi, "fov-roi", input_id, folder, scale=name)


def set_heatmap_style(scene, output: RunOutput, *, opacity: float, threshold: float, surfaces: bool = True) -> None:
    """Apply the panel's opacity and threshold to every heatmap of ``output`` (slice views and 3D)."""
    colours = display.heat_colour_table(scene)
    input_id = output.volume_node.GetID()
    folder = output_folder(scene, output.volume_node) if surfaces else None
    for nodule in output.nodules:
        for node in nodule.heatmap_nodes.values():
            display.style_heatmap(node, colours, threshold)
        combined = nodule.heatmap_nodes.get("combined")
        if surfaces and combined is not None:
            existing = find(scene, input_id, "heatmap-surface", number=nodule.number)
            made_from = f"{float(threshold):.6f} {combined.GetID()} {combined.GetImageData().GetMTime()}"
            if existing is not None and existing.GetAttribute(SURFACE_OF) == made_from:
                continue  # same level of the same voxels: contouring again would give the same surface
            surface = display.update_heatmap_surface(scene, existing, combined, threshold)
            surface.SetName(f"M3Net {nodule.label} heatmap surface")
            surface.SetAttribute(SURFACE_OF, made_from)
            tag(scene, surface, "heatmap-surface", input_id, folder, number=nodule.number)
    for composite in display.nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetForegroundOpacity(float(opacity))


def jump_to(scene, point_ras: Sequence[float]) -> None:
    """Centre every slice view on ``point_ras`` (e.g. the nodule being computed)."""
    display.jump_slice_views(scene, point_ras)


# -- finding results again in a loaded scene ----------------------------------------------------


def restore(scene, volume_node) -> RunOutput | None:
    """The results of ``volume_node`` as a loaded scene holds them, or None if it holds none.

    Reads the results table and the tagged heatmap nodes; needs neither torch nor the
    network, so it works on a computer without a GPU or the model file.
    """
    if volume_node is None:
        return None
    input_id = volume_node.GetID()
    table = find(scene, input_id, "results-table")
    if table is None or table.GetNumberOfRows() == 0:
        return None
    columns = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
    if not {"label", "probability", "prediction", "R", "A", "S"} <= set(columns):
        return None

    def cell(row: int, name: str) -> str:
        return table.GetCellText(row, columns[name]) if name in columns else ""

    nodules = []
    device = ""
    for row in range(table.GetNumberOfRows()):
        number = row + 1
        heatmaps = {
            node.GetAttribute(SCALE) or "combined": node
            for node in outputs(scene, input_id, "heatmap")
            if node.GetAttribute(NUMBER) == str(number)
        }
        attention = {s: _float(cell(row, f"attention_{s}")) for s in ("micro", "meso", "macro")}
        fields_of_view = {}
        combined = heatmaps.get("combined")
        if combined is not None and combined.GetAttribute(FIELDS_OF_VIEW):
            try:
                fields_of_view = {k: tuple(float(x) for x in v) for k, v in json.loads(
                    combined.GetAttribute(FIELDS_OF_VIEW)).items()}  # fmt: skip
            except (ValueError, TypeError, AttributeError):
                fields_of_view = {}
        nodules.append(
            NoduleOutput(
                number=number,
                label=cell(row, "label"),
                probability=_float(cell(row, "probability")),
                prediction=cell(row, "prediction"),
                scale_attention=None if any(math.isnan(v) for v in attention.values()) else attention,
                point_ras=tuple(_float(cell(row, axis)) for axis in "RAS"),
                fields_of_view_mm=fields_of_view,
                heatmap_nodes=heatmaps,
            )
        )
        device = device or cell(row, "device")
    return RunOutput(volume_node=volume_node, table_node=table, nodules=nodules, device=device)


def nodule_titles(output: RunOutput | None) -> list[str]:
    """What the *Show nodule* list offers: ``"label: 0.87 (malignant)"`` per nodule."""
    if output is None:
        return []
    return [f"{n.label}: {n.probability:.2f} ({n.prediction})" for n in output.nodules]


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan
