"""The module's Logic on real MRML scenes: geometry, answers, output nodes, failures."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk
import vtk.util.numpy_support
from M3NetSlicerLib.convert import control_points, ijk_to_ras_of_image, image_from_volume_node
from M3NetSlicerLib.logic import TABLE_COLUMNS, M3NetLogic, volume_source_path
from mrml_helpers import MODULE_DIR, add_points, add_volume

import m3netcore
from m3netcore.errors import M3NetInputError, ModelFileError


@pytest.fixture(scope="module")
def model():
    return m3netcore.load_model("demo")


def node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_volume_node_round_trip_keeps_voxels_and_lps_geometry(app, oblique_chest):
    image, _ = oblique_chest
    assert np.linalg.det(np.reshape(image.GetDirection(), (3, 3))) < 0  # flipped
    node = add_volume(app.scene, image)
    back = image_from_volume_node(node)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    # Slicer's own view of the geometry: voxel (0,0,0) sits at the LPS origin, negated in x and y.
    ras_origin = ijk_to_ras(node)[:3, 3]
    assert np.allclose(ras_origin, np.asarray(image.GetOrigin()) * [-1, -1, 1], atol=1e-6)


def test_probability_equals_core_predict_on_the_file_slicer_writes(app, oblique_chest, model, tmp_path):
    """Independent path: Slicer writes the node as NRRD; the core reads it and predicts at the LPS point."""
    image, nodules = oblique_chest
    volume = add_volume(app.scene, image)
    points = add_points(app.scene, nodules)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    app.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "ct.nrrd"))
    assert storage.WriteData(volume)
    from_file = m3netcore.read_image(tmp_path / "ct.nrrd")

    logic = M3NetLogic(app.scene, app.volume_rendering_logic)
    output = logic.run(volume, points, model, device="cpu", per_scale=True)
    expected = m3netcore.predict(model, from_file, [lps for _, lps in nodules], coords="LPS", device="cpu")

    assert [n.label for n in output.nodules] == [label for label, _ in nodules]
    for nodule, reference in zip(output.nodules, expected, strict=True):
        assert nodule.result.probability == pytest.approx(reference.probability, abs=1e-5)
        assert nodule.result.point_lps == pytest.approx(reference.point_lps, abs=1e-6)
        for scale, weight in reference.scale_attention.items():
            assert nodule.result.scale_attention[scale] == pytest.approx(weight, abs=1e-5)
        # Each heatmap node holds the core's heatmap image: same voxels, same place.
        assert set(nodule.heatmap_nodes) == set(reference.heatmaps)
        for scale, node in nodule.heatmap_nodes.items():
            core_image = reference.heatmaps[scale]
            assert np.allclose(ijk_to_ras(node), ijk_to_ras_of_image(core_image), atol=1e-5)
            shown = image_from_volume_node(node)
            assert np.allclose(sitk.GetArrayViewFromImage(shown), sitk.GetArrayViewFromImage(core_image), atol=1e-5)
    # The two nodules differ, so a swapped or shared answer would show.
    assert abs(output.nodules[0].result.probability - output.nodules[1].result.probability) > 0.5


def test_results_table_holds_what_the_results_say(app, small_chest, model):
    image, nodules = small_chest
    logic = M3NetLogic(app.scene)
    output = logic.run(add_volume(app.scene, image), add_points(app.scene, nodules), model, device="cpu")
    table = output.table_node
    assert table.GetNumberOfRows() == 2
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(TABLE_COLUMNS)
    for row, nodule in enumerate(output.nodules):
        result = nodule.result

        def cell(name, row=row):
            return table.GetCellText(row, TABLE_COLUMNS.index(name))

        assert cell("label") == nodule.label
        assert float(cell("probability")) == pytest.approx(result.probability, abs=1e-6)
        assert cell("prediction") == result.label
        for scale in ("micro", "meso", "macro"):
            assert float(cell(f"attention_{scale}")) == pytest.approx(result.scale_attention[scale], abs=1e-6)
        ras = result.point_ras
        assert [float(cell(axis)) for axis in "RAS"] == pytest.approx(ras, abs=1e-4)
        assert cell("model") == model.name and cell("model_version") == model.version
        assert cell("device") == "cpu"


def test_rerun_updates_the_same_nodes_under_the_input_volume(app, small_chest, model):
    image, nodules = small_chest
    volume = add_volume(app.scene, image)
    points = add_points(app.scene, nodules)
    logic = M3NetLogic(app.scene, app.volume_rendering_logic)
    first = logic.run(volume, points, model, device="cpu", per_scale=True)
    ids = {first.table_node.GetID()} | {n.GetID() for nod in first.nodules for n in nod.heatmap_nodes.values()}
    count = node_count(app.scene)
    second = logic.run(volume, points, model, device="cpu", per_scale=True)
    assert node_count(app.scene) == count
    assert {second.table_node.GetID()} | {
        n.GetID() for nod in second.nodules for n in nod.heatmap_nodes.values()
    } == ids

    # Fewer outputs asked for: the per-scale heatmaps go, the rest stay.
    third = logic.run(volume, points, model, device="cpu", per_scale=False)
    assert all(set(n.heatmap_nodes) == {"combined"} for n in third.nodules)
    assert len(logic.outputs(volume.GetID(), "heatmap")) == 2
    assert third.table_node.GetID() == first.table_node.GetID()

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    folder = hierarchy.GetItemChildWithName(hierarchy.GetItemByDataNode(volume), "M3Net")
    assert folder
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(folder, children)
    in_folder = {hierarchy.GetItemDataNode(children.GetId(i)).GetID() for i in range(children.GetNumberOfIds())}
    assert {n.GetID() for n in logic.outputs(volume.GetID())} == in_folder
    assert len(in_folder) == 1 + 2 + 2 + 3  # table, two heatmaps, their 3D surfaces, three field-of-view boxes


def test_show_nodule_jumps_and_places_the_fields_of_view(app, small_chest, model):
    from M3NetSlicerLib.headless import OffscreenViews

    image, nodules = small_chest
    views = OffscreenViews(app.scene, app.application_logic, size=64)
    volume = add_volume(app.scene, image)
    logic = M3NetLogic(app.scene)
    output = logic.run(volume, add_points(app.scene, nodules), model, device="cpu", opacity=0.7)
    logic.show_nodule(output, 1, opacity=0.7)
    nodule = output.nodules[1]
    composite = views.slice_logics["Red"].GetSliceCompositeNode()
    assert composite.GetForegroundVolumeID() == nodule.heatmap_nodes["combined"].GetID()
    assert composite.GetBackgroundVolumeID() == volume.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    red = views.slice_node("Red").GetSliceToRAS()
    assert red.GetElement(2, 3) == pytest.approx(nodule.result.point_ras[2], abs=1e-3)
    rois = logic.outputs(volume.GetID(), "fov-roi")
    assert len(rois) == 3
    for roi in rois:
        scale = roi.GetAttribute("M3Net.Scale")
        centre = [0.0, 0.0, 0.0]
        roi.GetCenter(centre)
        assert centre == pytest.approx(nodule.result.point_ras, abs=1e-6)
        assert list(roi.GetSize()) == pytest.approx(nodule.result.fields_of_view_mm[scale], abs=1e-6)


def test_volume_under_a_linear_transform_is_seen_where_it_is_shown(app, small_chest, model):
    image, nodules = small_chest
    shift = np.array([12.0, -7.0, 5.0])  # RAS mm
    volume = add_volume(app.scene, image)
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    for axis in range(3):
        matrix.SetElement(axis, 3, shift[axis])
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    moved = [(label, tuple(np.asarray(lps) + shift * [-1, -1, 1])) for label, lps in nodules]
    logic = M3NetLogic(app.scene)
    output = logic.run(volume, add_points(app.scene, moved), model, device="cpu")
    expected = m3netcore.predict(model, image, [lps for _, lps in nodules], device="cpu", explain=False)
    for nodule, reference in zip(output.nodules, expected, strict=True):
        assert nodule.result.probability == pytest.approx(reference.probability, abs=1e-5)


def test_cancel_between_nodules_changes_nothing(app, small_chest, model):
    image, nodules = small_chest
    volume = add_volume(app.scene, image)
    points = add_points(app.scene, nodules)
    before = node_count(app.scene)
    seen = []
    output = M3NetLogic(app.scene).run(
        volume,
        points,
        model,
        device="cpu",
        progress=lambda done, total, label: seen.append((done, total, label)),
        should_cancel=lambda: len(seen) >= 1,
    )
    assert output is None
    assert seen == [(0, 2, nodules[0][0])]
    assert node_count(app.scene) == before


def test_failures_give_one_clear_message_and_leave_the_scene_alone(app, small_chest, model, tmp_path):
    image, nodules = small_chest
    volume = add_volume(app.scene, image)
    points = add_points(app.scene, nodules)
    empty = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    empty.SetName("empty")
    outside = add_points(app.scene, [nodules[0], ("far away", (400.0, 0.0, 0.0))], name="outside")
    rgb = app.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode")
    rgb.SetName("photo")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 4)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(data)
    (tmp_path / "bad.safetensors").write_bytes(b"not a model")
    logic = M3NetLogic(app.scene)
    before = node_count(app.scene)

    with pytest.raises(M3NetInputError, match="no input volume"):
        logic.run(None, points, model)
    with pytest.raises(M3NetInputError, match="no nodule points"):
        logic.run(volume, None, model)
    with pytest.raises(M3NetInputError, match="'empty' has no placed points"):
        logic.run(volume, empty, model)
    with pytest.raises(M3NetInputError, match="point 'far away'"):
        logic.run(volume, outside, model)
    with pytest.raises(M3NetInputError, match="3 components"):
        logic.run(rgb, points, model)
    with pytest.raises(M3NetInputError, match="no such model file"):
        logic.load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError):
        logic.load_model(tmp_path / "bad.safetensors")
    assert node_count(app.scene) == before
    assert logic.outputs(volume.GetID()) == []


def test_control_points_skip_unplaced_points_and_convert_to_lps(app):
    node = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    node.AddControlPoint(10.0, 20.0, 30.0, "a")
    node.AddControlPoint(0.0, 0.0, 0.0, "b")
    node.SetNthControlPointPositionMissing(1)
    assert control_points(node) == [("a", (-10.0, -20.0, 30.0))]


def test_3d_leaves_the_cts_own_display_alone_and_draws_heatmap_surfaces(app, small_chest, model):
    """The CT's 3D display stays as the user set it; each nodule's heatmap is a model (standard renderer)."""
    image, nodules = small_chest
    volume = add_volume(app.scene, image)
    vr = app.volume_rendering_logic
    own = vr.CreateVolumeRenderingDisplayNode()
    app.scene.AddNode(own)
    volume.AddAndObserveDisplayNodeID(own.GetID())
    own.SetVisibility(False)  # the user turned the CT's volume rendering off
    before = [volume.GetNthDisplayNode(i).GetID() for i in range(volume.GetNumberOfDisplayNodes())]
    logic = M3NetLogic(app.scene, vr)
    output = logic.run(volume, add_points(app.scene, nodules), model, device="cpu", threshold=0.3)
    assert [volume.GetNthDisplayNode(i).GetID() for i in range(volume.GetNumberOfDisplayNodes())] == before
    assert not own.GetVisibility()
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode") == 1
    surfaces = logic.outputs(volume.GetID(), "heatmap-surface")
    assert sorted(s.GetAttribute("M3Net.Nodule") for s in surfaces) == ["1", "2"]
    for nodule in output.nodules:
        (surface,) = [s for s in surfaces if s.GetAttribute("M3Net.Nodule") == str(nodule.number)]
        points = vtk.util.numpy_support.vtk_to_numpy(surface.GetPolyData().GetPoints().GetData())
        assert len(points) > 50 and surface.GetDisplayNode().GetVisibility()
        # The surface surrounds the heatmap's peak, in RAS, inside the micro-to-macro field of view.
        assert np.linalg.norm(points.mean(axis=0) - nodule.point_ras) < 30.0
        heat = sitk.GetArrayFromImage(nodule.result.heatmaps["combined"])
        assert (heat >= 0.3).sum() > 0
    # A higher threshold draws a smaller surface; rerunning keeps the same nodes.
    first = surfaces[0]
    area = _area(first)
    made = first.GetPolyData().GetMTime()
    logic.set_heatmap_style(output, opacity=0.9, threshold=0.3)  # opacity only: no contouring again
    logic.show_nodule(output, 1, opacity=0.9, threshold=0.3)
    assert first.GetPolyData().GetMTime() == made
    logic.set_heatmap_style(output, opacity=0.5, threshold=0.8)
    assert _area(first) < area
    ids = sorted(s.GetID() for s in surfaces)
    logic.run(volume, add_points(app.scene, nodules, name="again"), model, device="cpu")
    assert sorted(s.GetID() for s in logic.outputs(volume.GetID(), "heatmap-surface")) == ids


def _area(model_node) -> float:
    mass = vtk.vtkMassProperties()
    triangles = vtk.vtkTriangleFilter()
    triangles.SetInputData(model_node.GetPolyData())
    mass.SetInputConnection(triangles.GetOutputPort())
    mass.Update()
    return mass.GetSurfaceArea()


def test_results_table_records_where_the_answer_came_from(app, small_chest, model, tmp_path):
    """The table carries the provenance ``m3net predict`` writes: input checksum, model checksum, device, time."""
    import hashlib
    import json

    image, nodules = small_chest
    volume = add_volume(app.scene, image)
    points = add_points(app.scene, nodules)
    logic = M3NetLogic(app.scene)
    demo = logic.load_model("demo")
    table = logic.run(volume, points, demo, device="cpu").table_node
    assert table.GetAttribute("M3Net.provenance.input.kind") == "unsaved"  # made in memory, no file

    assert volume.AddDefaultStorageNode()
    storage = volume.GetStorageNode()
    storage.SetFileName(str(tmp_path / "ct.nrrd"))
    assert storage.WriteData(volume)
    table = logic.run(volume, points, demo, device="cpu").table_node
    sha256 = hashlib.sha256((tmp_path / "ct.nrrd").read_bytes()).hexdigest()
    registry = json.loads((MODULE_DIR.parent / "M3NetCore" / "m3netcore" / "weights" / "registry.json").read_text())
    assert table.GetAttribute("M3Net.provenance.input.kind") == "file"
    assert table.GetAttribute("M3Net.provenance.input.sha256") == sha256
    assert table.GetAttribute("M3Net.provenance.model.name") == demo.name
    assert table.GetAttribute("M3Net.provenance.model.sha256") == registry["demo"]["sha256"]
    assert table.GetAttribute("M3Net.provenance.device") == "cpu"
    assert table.GetAttribute("M3Net.provenance.software.version") == m3netcore.__version__
    assert table.GetAttribute("M3Net.provenance.time")

    other = logic.load_model("lidc-phantom")  # a rerun with another model replaces the record
    table = logic.run(volume, points, other, device="cpu").table_node
    assert table.GetAttribute("M3Net.provenance.model.sha256") == registry["lidc-phantom"]["sha256"]
    assert volume_source_path(volume) == str(tmp_path / "ct.nrrd")
