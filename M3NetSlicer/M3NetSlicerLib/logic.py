"""The module's logic without Qt: a scene, a CT node and points in; output nodes out.

The desktop module, the batch script and the tests all drive :class:`M3NetLogic`. It
converts at the edge (:mod:`convert`), calls :func:`m3netcore.predict` and displays what
comes back (:mod:`scene_outputs`, :mod:`display`); it never re-implements the core.

Output nodes are found again by their attributes (role, input volume, nodule number), so
running again updates them in place, and they live in the subject hierarchy in a folder
under the input volume.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import slicer
import vtk

import m3netcore
from m3netcore.errors import M3NetInputError
from m3netcore.geometry import lps_to_ras
from M3NetSlicerLib import display, scene_outputs
from M3NetSlicerLib.convert import control_points, image_from_volume_node, update_volume_node_from_image
from M3NetSlicerLib.scene_outputs import TABLE_COLUMNS, NoduleOutput, RunOutput

__all__ = ["TABLE_COLUMNS", "M3NetLogic", "NoduleOutput", "RunOutput", "results_table", "volume_source_path"]
PROVENANCE_PREFIX = "M3Net.provenance."


class M3NetLogic:
    """Run M3Net on points of a CT volume node and show the answers in ``scene``.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in the application).
        volume_rendering_logic: kept for callers that volume-render the CT themselves
            (the batch script); the heatmaps are shown in 3D as surfaces without it.
    """

    def __init__(self, scene, volume_rendering_logic=None) -> None:
        self.scene = scene
        self.volume_rendering_logic = volume_rendering_logic
        self._models: dict[tuple[str, float], m3netcore.Model] = {}
        self._model_sources: dict[int, str] = {}  # id(model) -> what it was loaded from
        self._input_records: dict[tuple, dict] = {}  # (path, mtime, size) -> input provenance

    # -- model ---------------------------------------------------------------------------

    def load_model(self, source: str | os.PathLike = "demo") -> m3netcore.Model:
        """A bundled model's name (``"demo"``, ``"lidc-phantom"``) or a model file; cached.

        Raises:
            M3NetInputError / ModelFileError: no such model, or a file that is not one.
        """
        text = str(source).strip() or "demo"
        stamp = Path(text).stat().st_mtime if Path(text).is_file() else 0.0
        key = (text, stamp)
        if key not in self._models:
            from m3netcore.checkpoint import bundled_registry

            if text not in bundled_registry() and not Path(text).is_file():
                raise M3NetInputError(f"no such model file: {text}")
            self._models[key] = m3netcore.load_model(text)
            self._model_sources[id(self._models[key])] = text
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
        image=None,
    ) -> list[tuple[str, m3netcore.NoduleResult]] | None:
        """The core's answers for every placed point; the scene is not touched.

        ``progress(done, total, label)`` is called before each nodule and at the end;
        ``should_cancel()`` is asked before each nodule and after the last, and ``None``
        is returned if it said so. ``image``: the volume as an image, if the caller has it.

        Raises:
            M3NetInputError: no volume, no points, a point outside the volume, and the like.
        """
        image = image_from_volume_node(volume_node) if image is None else image
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
        if should_cancel is not None and should_cancel():
            return None
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
        image = image_from_volume_node(volume_node)  # once: a CT is tens of megabytes
        answers = self.predict(
            volume_node, points_node, model, device=device, progress=progress, should_cancel=should_cancel, image=image
        )
        if answers is None:
            return None
        output = self.write_outputs(volume_node, answers, per_scale=per_scale, threshold=threshold)
        self._record_provenance(output, model, image)
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
        scene = self.scene
        input_id = volume_node.GetID()
        folder = scene_outputs.output_folder(scene, volume_node)
        colours = display.heat_colour_table(scene)
        wanted: set[str] = set()
        nodules = []
        scene.StartState(scene.BatchProcessState)
        try:
            table = self._output_node("vtkMRMLTableNode", "results-table", input_id, folder)
            table.SetName(f"{volume_node.GetName()} M3Net results")
            wanted.add(table.GetID())
            table.SetAndObserveTable(results_table(answers))
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
                    node.SetAttribute(
                        scene_outputs.FIELDS_OF_VIEW,
                        json.dumps({k: list(v) for k, v in result.fields_of_view_mm.items()}),
                    )
                    update_volume_node_from_image(node, result.heatmaps[scale])
                    display.style_heatmap(node, colours, threshold)
                    nodes[scale] = node
                    wanted.add(node.GetID())
                    if scale == "combined":
                        surface = scene_outputs.find(scene, input_id, "heatmap-surface", number=number)
                        if surface is not None:
                            wanted.add(surface.GetID())
                nodules.append(_nodule_output(number, label, result, nodes))
            scene_outputs.remove_stale(scene, input_id, wanted, roles=("results-table", "heatmap", "heatmap-surface"))
        finally:
            scene.EndState(scene.BatchProcessState)
        device = answers[0][1].model.get("device", "") if answers else ""
        return RunOutput(volume_node=volume_node, table_node=table, nodules=nodules, device=device)

    def _record_provenance(self, output: RunOutput, model: m3netcore.Model, image) -> None:
        """The run's provenance (as ``m3net predict`` writes it) as attributes of the results table."""
        from m3netcore.provenance import input_provenance, node_attributes, provenance

        volume = output.volume_node
        source = volume_source_path(volume)
        record = provenance(image, None, model, output.device, model_source=self._model_sources.get(id(model)))
        if source is not None:  # the input's checksum, once per file version (a CT file can be large)
            stat = Path(source).stat()
            key = (source, stat.st_mtime_ns, stat.st_size)
            if key not in self._input_records:
                self._input_records[key] = input_provenance(image, source)
            record["input"] = self._input_records[key]
        table = output.table_node
        names = vtk.vtkStringArray()
        table.GetAttributeNames(names)
        for index in range(names.GetNumberOfValues()):  # drop an earlier run's record first
            if names.GetValue(index).startswith(PROVENANCE_PREFIX):
                table.RemoveAttribute(names.GetValue(index))
        for name, value in node_attributes(record, PROVENANCE_PREFIX).items():
            table.SetAttribute(name, value)

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
        """Show nodule ``index`` (see :func:`scene_outputs.show_nodule`); ``render_3d``: heatmap surfaces."""
        scene_outputs.show_nodule(
            self.scene, output, index, opacity=opacity, threshold=threshold, scale=scale, surfaces=render_3d
        )

    def set_heatmap_style(self, output: RunOutput, *, opacity: float, threshold: float) -> None:
        """Apply the panel's opacity and threshold to every heatmap of ``output``."""
        scene_outputs.set_heatmap_style(self.scene, output, opacity=opacity, threshold=threshold)

    def outputs(self, input_id: str, role: str | None = None) -> list:
        """The output nodes of the input volume with ID ``input_id`` (of one role, if given)."""
        return scene_outputs.outputs(self.scene, input_id, role)

    def _output_node(self, class_name: str, role: str, input_id: str, folder: int, *, number=None, scale=None):
        node = scene_outputs.find(self.scene, input_id, role, number=number, scale=scale)
        if node is None:
            node = self.scene.AddNewNodeByClass(class_name)
        scene_outputs.tag(self.scene, node, role, input_id, folder, number=number, scale=scale)
        return node


def volume_source_path(volume_node) -> str | None:
    """The file a volume came from: a DICOM file of its series, or its own file; None if unsaved."""
    instance_uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)  # the application's DICOM database
    if instance_uids and database is not None:
        path = database.fileForInstance(instance_uids[0])
        if path and Path(path).is_file():
            return str(path)
    storage = volume_node.GetStorageNode()
    if storage is not None and storage.GetFileName() and Path(storage.GetFileName()).is_file():
        return str(storage.GetFileName())
    return None


def _nodule_output(number: int, label: str, result: m3netcore.NoduleResult, nodes: dict) -> NoduleOutput:
    return NoduleOutput(
        number=number,
        label=label,
        probability=float(result.probability),
        prediction=result.label,
        scale_attention=dict(result.scale_attention) if result.scale_attention else None,
        point_ras=tuple(float(v) for v in lps_to_ras(result.point_lps)),
        fields_of_view_mm={k: tuple(v) for k, v in result.fields_of_view_mm.items()},
        heatmap_nodes=nodes,
        result=result,
    )


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
