"""The module's logic without Qt: a scene, a CT node and points in; output nodes out.

The desktop module, the batch script and the tests all drive :class:`M3NetLogic`. It
converts at the edge (:mod:`convert`), calls :func:`m3netcore.predict` and displays what
comes back (:mod:`display`); it never re-implements the core.

Output nodes are found again by their attributes (role, input volume, nodule number), so
running again updates them in place, and they live in the subject hierarchy in a folder
under the input volume.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import slicer
import vtk

import m3netcore
from m3netcore.errors import M3NetInputError
from m3netcore.geometry import lps_to_ras
from M3NetSlicerLib import display
from M3NetSlicerLib.convert import control_points, image_from_volume_node, update_volume_node_from_image

INPUT = "M3Net.Input"  # attribute: the ID of the input volume an output belongs to
NUMBER = "M3Net.Nodule"  # attribute: 1-based nodule number
SCALE = "M3Net.Scale"  # attribute: "combined" or a scale name
FOLDER_NAME = "M3Net"
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
    """One nodule's answer and the nodes that show it."""

    number: int
    label: str
    result: m3netcore.NoduleResult
    heatmap_nodes: dict[str, object] = field(default_factory=dict)  # "combined" and, on request, each scale


@dataclass
class RunOutput:
    """What one Apply produced."""

    volume_node: object
    table_node: object
    nodules: list[NoduleOutput]
    device: str
    seconds: float


class M3NetLogic:
    """Run M3Net on points of a CT volume node and show the answers in ``scene``.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in the application).
        volume_rendering_logic: the VolumeRendering module's logic; without it the 3D
            view shows no heatmap (everything else works).
    """

    def __init__(self, scene, volume_rendering_logic=None) -> None:
        self.scene = scene
        self.volume_rendering_logic = volume_rendering_logic
        self._models: dict[tuple[str, float], m3netcore.Model] = {}

    # -- model ---------------------------------------------------------------------------

    def load_model(self, source: str | os.PathLike = "demo") -> m3netcore.Model:
        """``"demo"`` (the bundled model) or a model file from ``m3net train``; cached.

        Raises:
            M3NetInputError / ModelFileError: no such model, or a file that is not one.
        """
        text = str(source).strip() or "demo"
        stamp = Path(text).stat().st_mtime if Path(text).is_file() else 0.0
        key = (text, stamp)
        if key not in self._models:
            if text != "demo" and not Path(text).is_file():
                raise M3NetInputError(f"no such model file: {text}")
            self._models[key] = m3netcore.load_model(text)
        return self._models[key]

    # -- running ---------------------------------------------------------------------------

    def predict(
        self,
        volume_node,
        points_node,
        model: m3netcore.Model,
        *,
        device: str = "auto",
        explain: bool = True,
        progress: Callable[[int, int, str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[tuple[str, m3netcore.NoduleResult]] | None:
        """The core's answers for every placed point; the scene is not touched.

        ``progress(done, total, label)`` is called before each nodule and at the end;
        ``should_cancel()`` is asked between nodules, and ``None`` is returned if it said so.

        Raises:
            M3NetInputError: no volume, no points, a point outside the volume, and the like.
        """
        image = image_from_volume_node(volume_node)
        points = control_points(points_node)
        answers = []
        for done, (label, point_lps) in enumerate(points):
            if should_cancel is not None and should_cancel():
                return None
            if progress is not None:
                progress(done, len(points), label)
            try:
                (result,) = m3netcore.predict(model, image, [point_lps], coords="LPS", explain=explain, device=device)
            except M3NetInputError as err:
                raise M3NetInputError(f"point {label!r}: {err}") from err
            answers.append((label, result))
        if progress is not None:
            progress(len(points), len(points), "")
        return answers

    def run(
        self,
        volume_node,
        points_node,
        model: m3netcore.Model,
        *,
        device: str = "auto",
        per_scale: bool = False,
        opacity: float = 0.5,
        threshold: float = 0.2,
        progress: Callable[[int, int, str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> RunOutput | None:
        """Predict, then write and show the outputs; ``None`` (and no change) if cancelled.

        Every failure happens before the scene is changed, so nothing is left half-done.
        """
        start = time.perf_counter()
        answers = self.predict(
            volume_node, points_node, model, device=device, progress=progress, should_cancel=should_cancel
        )
        if answers is None:
            return None
        output = self.write_outputs(volume_node, answers, per_scale=per_scale, threshold=threshold)
        output.seconds = time.perf_counter() - start
        self.show_nodule(output, 0, opacity=opacity, threshold=threshold)
        return output

    # -- output nodes ------------------------------------------------------------------------

    def write_outputs(
        self,
        volume_node,
        answers: Sequence[tuple[str, m3netcore.NoduleResult]],
        *,
        per_scale: bool = False,
        threshold: float = 0.2,
    ) -> RunOutput:
        """Create or update the table and heatmap nodes for ``answers``; remove stale ones."""
        input_id = volume_node.GetID()
        folder = self._output_folder(volume_node)
        colours = display.heat_colour_table(self.scene)
        wanted: set[str] = set()
        nodules = []
        self.scene.StartState(self.scene.BatchProcessState)
        try:
            table = self._output_node("vtkMRMLTableNode", "results-table", input_id, folder)
            table.SetName(f"{volume_node.GetName()} M3Net results")
            wanted.add(table.GetID())
            table.SetAndObserveTable(results_table([(label, r) for label, r in answers]))
            for number, (label, result) in enumerate(answers, start=1):
                scales = ["combined"] + ([s for s in result.heatmaps if s != "combined"] if per_scale else [])
                nodes = {}
                for scale in scales:
                    if scale not in result.heatmaps:
                        continue
                    node = self._output_node(
                        "vtkMRMLScalarVolumeNode", "heatmap", input_id, folder, number=number, scale=scale
                    )
                    node.SetName(f"M3Net {label} heatmap" + ("" if scale == "combined" else f" {scale}"))
                    update_volume_node_from_image(node, result.heatmaps[scale])
                    display.style_heatmap(node, colours, threshold)
                    nodes[scale] = node
                    wanted.add(node.GetID())
                nodules.append(NoduleOutput(number=number, label=label, result=result, heatmap_nodes=nodes))
            self._remove_stale(input_id, wanted, roles=("results-table", "heatmap"))
        finally:
            self.scene.EndState(self.scene.BatchProcessState)
        device = answers[0][1].model.get("device", "") if answers else ""
        return RunOutput(volume_node=volume_node, table_node=table, nodules=nodules, device=device, seconds=0.0)

    def show_nodule(
        self,
        output: RunOutput,
        index: int,
        *,
        opacity: float = 0.5,
        threshold: float = 0.2,
        scale: str = "combined",
        render_3d: bool = True,
    ) -> None:
        """Show nodule ``index``: heatmap over the CT, slice views on it, its three fields of view.

        In 3D, the CT and every nodule's combined heatmap are volume-rendered together.
        """
        nodule = output.nodules[index]
        heatmap = nodule.heatmap_nodes.get(scale) or nodule.heatmap_nodes.get("combined")
        self.set_heatmap_style(output, opacity=opacity, threshold=threshold)
        display.show_in_slice_views(self.scene, output.volume_node, heatmap, opacity)
        centre_ras = lps_to_ras(nodule.result.point_lps)
        display.jump_slice_views(self.scene, centre_ras)
        folder = self._output_folder(output.volume_node)
        for name, fov in nodule.result.fields_of_view_mm.items():
            existing = self._find(output.volume_node.GetID(), "fov-roi", scale=name)
            roi = display.update_roi(
                self.scene,
                existing,
                f"M3Net {name} field of view",
                centre_ras,
                fov,
                display.SCALE_COLOURS.get(name, (1, 1, 1)),
            )
            self._tag(roi, "fov-roi", output.volume_node.GetID(), folder, scale=name)
        if render_3d and self.volume_rendering_logic is not None:
            self._render_3d(output, threshold)

    def set_heatmap_style(self, output: RunOutput, *, opacity: float, threshold: float) -> None:
        """Apply the panel's opacity and threshold to every heatmap of ``output``."""
        colours = display.heat_colour_table(self.scene)
        for nodule in output.nodules:
            for node in nodule.heatmap_nodes.values():
                display.style_heatmap(node, colours, threshold)
                for index in range(node.GetNumberOfDisplayNodes()):
                    vr = node.GetNthDisplayNode(index)
                    if vr is not None and vr.IsA("vtkMRMLVolumeRenderingDisplayNode"):
                        display.set_heatmap_transfer_functions(vr.GetVolumePropertyNode(), threshold)
        for composite in display.nodes_of_class(self.scene, "vtkMRMLSliceCompositeNode"):
            composite.SetForegroundOpacity(float(opacity))

    def _render_3d(self, output: RunOutput, threshold: float) -> None:
        volume = output.volume_node
        ct_had_rendering = any(
            volume.GetNthDisplayNode(i) is not None
            and volume.GetNthDisplayNode(i).IsA("vtkMRMLMultiVolumeRenderingDisplayNode")
            for i in range(volume.GetNumberOfDisplayNodes())
        )  # keep the transfer functions of an earlier run (the user may have changed them)
        ct_display = display.volume_rendering_display(self.volume_rendering_logic, volume)
        if not ct_had_rendering:
            display.set_ct_transfer_functions(ct_display.GetVolumePropertyNode())
        ct_display.SetVisibility(True)
        for nodule in output.nodules:
            node = nodule.heatmap_nodes["combined"]
            heat_display = display.volume_rendering_display(self.volume_rendering_logic, node)
            display.set_heatmap_transfer_functions(heat_display.GetVolumePropertyNode(), threshold)
            heat_display.SetVisibility(True)

    # -- finding and tagging output nodes ------------------------------------------------------

    def _output_folder(self, volume_node) -> int:
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        volume_item = hierarchy.GetItemByDataNode(volume_node)
        if not volume_item:
            volume_item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), volume_node)
        folder = hierarchy.GetItemChildWithName(volume_item, FOLDER_NAME)
        if not folder:
            folder = hierarchy.CreateFolderItem(volume_item, FOLDER_NAME)
        return folder

    def _output_node(self, class_name: str, role: str, input_id: str, folder: int, *, number=None, scale=None):
        node = self._find(input_id, role, number=number, scale=scale)
        if node is None:
            node = self.scene.AddNewNodeByClass(class_name)
        self._tag(node, role, input_id, folder, number=number, scale=scale)
        return node

    def _tag(self, node, role: str, input_id: str, folder: int, *, number=None, scale=None) -> None:
        node.SetAttribute(display.ROLE, role)
        node.SetAttribute(INPUT, input_id)
        if number is not None:
            node.SetAttribute(NUMBER, str(number))
        if scale is not None:
            node.SetAttribute(SCALE, scale)
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        item = hierarchy.GetItemByDataNode(node)
        if not item:
            hierarchy.CreateItem(folder, node)
        elif hierarchy.GetItemParent(item) != folder:
            hierarchy.SetItemParent(item, folder)

    def _find(self, input_id: str, role: str, *, number=None, scale=None):
        for node in self.outputs(input_id, role):
            if number is not None and node.GetAttribute(NUMBER) != str(number):
                continue
            if scale is not None and node.GetAttribute(SCALE) != scale:
                continue
            return node
        return None

    def outputs(self, input_id: str, role: str | None = None) -> list:
        """The output nodes of the input volume with ID ``input_id`` (of one role, if given)."""
        return [
            node
            for node in display.nodes_of_class(self.scene, "vtkMRMLNode")
            if node.GetAttribute(INPUT) == input_id and (role is None or node.GetAttribute(display.ROLE) == role)
        ]

    def _remove_stale(self, input_id: str, keep: set[str], roles: Sequence[str]) -> None:
        for role in roles:
            for node in self.outputs(input_id, role):
                if node.GetID() not in keep:
                    remove_node(self.scene, node)


def remove_node(scene, node) -> None:
    """Remove ``node``, its display nodes and its subject hierarchy item."""
    for index in reversed(range(node.GetNumberOfDisplayNodes())):
        shown = node.GetNthDisplayNode(index)
        if shown is not None:
            scene.RemoveNode(shown)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.RemoveItem(item, False, False)
    scene.RemoveNode(node)


def results_table(answers: Sequence[tuple[str, m3netcore.NoduleResult]]):
    """A ``vtkTable`` with one row per nodule, columns :data:`TABLE_COLUMNS`."""
    table = vtk.vtkTable()
    numeric = {"probability", "attention_micro", "attention_meso", "attention_macro", "R", "A", "S"}
    columns = {}
    for name in TABLE_COLUMNS:
        column = vtk.vtkDoubleArray() if name in numeric else vtk.vtkStringArray()
        column.SetName(name)
        table.AddColumn(column)
        columns[name] = column
    for label, result in answers:
        attention = result.scale_attention or {}
        ras = lps_to_ras(result.point_lps)
        values = {
            "label": label,
            "probability": result.probability,
            "prediction": result.label,
            "attention_micro": attention.get("micro", math.nan),
            "attention_meso": attention.get("meso", math.nan),
            "attention_macro": attention.get("macro", math.nan),
            "R": ras[0],
            "A": ras[1],
            "S": ras[2],
            "model": str(result.model.get("name", "")),
            "model_version": str(result.model.get("version", "")),
            "device": str(result.model.get("device", "")),
        }
        for name, value in values.items():
            columns[name].InsertNextValue(value)
    return table

