"""The panel's decisions (``PanelController``) on real MRML, through what a user does in order.

The desktop widget only wires Qt signals to this controller, so these sequences are the
panel's behaviour: which model runs, when dependencies are checked, which nodes are
offered as the CT, what a rerun replaces, and how a saved scene shows its results again.
"""

from __future__ import annotations

import ast
import dataclasses

import pytest
import slicer
from M3NetSlicerLib import scene_outputs
from M3NetSlicerLib.headless import HeadlessApplication
from M3NetSlicerLib.panel import PanelController, PanelParameters, read_model_header
from M3NetSlicerLib.scene_files import save_scene
from mrml_helpers import MODULE_DIR, add_points, add_volume

import m3netcore


class DependencyChecks:
    """Counts the panel's dependency checks (the real check would ask to install PyTorch)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def other_model_file(tmp_path_factory):
    """A model file that is not the bundled demo: same weights, another name, a shifted calibration."""
    model = m3netcore.load_model("demo")
    model.name, model.version, model.card = "other-model", "9.9", "# other-model\n\nA file the user chose."
    path = tmp_path_factory.mktemp("models") / "other.safetensors"
    m3netcore.save_model(model, path)
    return path


def panel_on(app, image, nodules, **values):
    checks = DependencyChecks()
    params = PanelParameters(inputVolume=add_volume(app.scene, image), nodules=add_points(app.scene, nodules), **values)
    panel = PanelController(app.scene, params, ensure_dependencies=checks)
    return panel, params, checks


def model_column(output) -> list[str]:
    table = output.table_node
    column = scene_outputs.TABLE_COLUMNS.index("model")
    return [table.GetCellText(row, column) for row in range(table.GetNumberOfRows())]


def test_file_then_demo_then_file_again_runs_the_file_the_panel_shows(app, small_chest, other_model_file):
    image, nodules = small_chest
    panel, params, _ = panel_on(app, image, nodules, device="cpu")
    panel.set_model_path(str(other_model_file))  # the path box's currentPathChanged
    assert panel.model_to_run() == str(other_model_file) and panel.path_box_visible()
    panel.set_model_source("demo")
    assert panel.model_to_run() == "demo" and not panel.path_box_visible()
    assert "other-model" not in panel.model_card()
    # Back to the file: the path box shows the kept path and emits nothing (same text).
    panel.set_model_source("file")
    assert params.modelPath == str(other_model_file)
    assert panel.model_to_run() == str(other_model_file)
    assert panel.model_card().startswith("# other-model")
    output = panel.apply()
    assert model_column(output) == ["other-model", "other-model"]


def test_every_bundled_model_is_offered_and_runs(app, small_chest):
    image, nodules = small_chest
    panel, params, _ = panel_on(app, image, nodules, device="cpu")
    keys = [key for key, _ in panel.model_sources()]
    assert keys[-1] == "file" and {"demo", "lidc-phantom"} <= set(keys)
    panel.set_model_source("lidc-phantom")
    assert "lidc-phantom" in panel.model_card() and "SEMI-SYNTHETIC" in panel.model_card()
    assert model_column(panel.apply()) == ["m3net-lidc-phantom"] * 2
    with pytest.raises(ValueError, match="unknown model source 'resnet'"):
        panel.set_model_source("resnet")


def test_opening_a_scene_from_another_computer_loads_nothing_and_asks_nothing(app, small_chest):
    """A saved parameter node naming a model file that is not here: the card says so, Apply is off."""
    image, nodules = small_chest
    missing = "/home/someone-else/models/m3net.safetensors"
    panel, params, checks = panel_on(app, image, nodules, modelSource="file", modelPath=missing)
    assert panel.model_source() == "file" and panel.path_box_visible()
    assert "not found on this computer" in panel.model_card() and missing in panel.model_card()
    ready, reason = panel.apply_state()
    assert not ready and missing in reason
    for key, _ in panel.model_sources():  # the user browses the list: cards only, no dependency check
        panel.set_model_source(key)
        panel.model_card()
    assert panel.restore() is None
    panel.show(0)
    assert checks.calls == 0
    with pytest.raises(ValueError, match="does not exist"):
        panel.set_model_source("file")
        panel.apply()
    assert checks.calls == 0


def test_scenes_of_older_versions_keep_their_model_choice():
    panel = PanelController(slicer.vtkMRMLScene(), PanelParameters(modelPath="/models/a.safetensors"),
                            ensure_dependencies=DependencyChecks())  # fmt: skip
    assert panel.model_source() == "file" and panel.model_to_run() == "/models/a.safetensors"
    panel.parameters = PanelParameters()
    assert panel.model_source() == "demo" and panel.model_to_run() == "demo"
    panel.set_model_source("file")
    assert panel.model_to_run() is None and not panel.apply_state()[0]


def test_outputs_are_never_offered_as_the_ct(app, small_chest):
    image, nodules = small_chest
    panel, params, _ = panel_on(app, image, nodules, device="cpu", perScale=True)
    ct = params.inputVolume
    output = panel.apply()
    heatmaps = {node.GetID() for nodule in output.nodules for node in nodule.heatmap_nodes.values()}
    assert len(heatmaps) == 8
    assert set(panel.hidden_input_ids()) == heatmaps
    # A scene whose first volume is a heatmap (e.g. loaded in that order): the CT is picked.
    fresh = HeadlessApplication.create()
    heat = fresh.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    heat.SetAttribute(scene_outputs.ROLE, "heatmap")
    other_ct = add_volume(fresh.scene, image)
    chooser = PanelController(fresh.scene, PanelParameters(), ensure_dependencies=DependencyChecks())
    assert chooser.default_input_volume() is other_ct
    chooser.parameters.inputVolume = heat
    assert chooser.apply_state() == (False, "The selected volume is an M3Net output; select the CT.")
    assert ct.GetAttribute(scene_outputs.ROLE) is None


def test_dependencies_are_checked_on_apply_only_once(app, small_chest):
    image, nodules = small_chest
    panel, params, checks = panel_on(app, image, nodules, device="cpu")
    panel.model_card()
    panel.restore()
    assert checks.calls == 0
    panel.apply()
    panel.apply()
    assert checks.calls == 1


def test_apply_save_close_reload_then_show_nodule_2(app, small_chest, tmp_path):
    image, nodules = small_chest
    panel, params, _ = panel_on(app, image, nodules, device="cpu", perScale=True, threshold=0.25)
    output = panel.apply()
    titles = panel.nodule_titles()
    save_scene(app.scene, tmp_path / "saved")

    reopened = HeadlessApplication.create()  # a new session: nothing of the run is in memory
    reopened.scene.SetURL(str(tmp_path / "saved" / "scene.mrml"))
    assert reopened.scene.Import()
    slicer.mrmlScene = reopened.scene
    from M3NetSlicerLib.headless import OffscreenViews

    views = OffscreenViews(reopened.scene, reopened.application_logic, size=64)
    checks = DependencyChecks()
    ct = reopened.scene.GetFirstNodeByName("CT")
    panel = PanelController(reopened.scene, PanelParameters(inputVolume=ct, threshold=0.25), ensure_dependencies=checks)
    restored = panel.restore()
    assert restored is not None and panel.nodule_titles() == titles
    second = restored.nodules[1]
    assert second.label == nodules[1][0]
    assert second.point_ras == pytest.approx(output.nodules[1].point_ras, abs=1e-4)
    assert second.fields_of_view_mm == output.nodules[1].fields_of_view_mm
    assert set(second.heatmap_nodes) == {"combined", "micro", "meso", "macro"}

    panel.show(1, scale="meso")
    composite = views.slice_logics["Red"].GetSliceCompositeNode()
    assert composite.GetForegroundVolumeID() == second.heatmap_nodes["meso"].GetID()
    assert composite.GetBackgroundVolumeID() == ct.GetID()
    assert views.slice_node("Red").GetSliceToRAS().GetElement(2, 3) == pytest.approx(second.point_ras[2], abs=1e-3)
    boxes = scene_outputs.outputs(reopened.scene, ct.GetID(), "fov-roi")
    rois = {roi.GetAttribute("M3Net.Scale"): roi for roi in boxes}
    centre = [0.0, 0.0, 0.0]
    rois["macro"].GetCenter(centre)
    assert centre == pytest.approx(second.point_ras, abs=1e-4)
    assert list(rois["macro"].GetSize()) == pytest.approx(second.fields_of_view_mm["macro"])
    panel.set_style(opacity=0.8, threshold=0.6)
    assert second.heatmap_nodes["combined"].GetDisplayNode().GetLowerThreshold() == pytest.approx(0.6)
    assert composite.GetForegroundOpacity() == pytest.approx(0.8)
    assert checks.calls == 0  # showing saved results needs no torch and no model
    # The reopened scene's outputs are still found by a rerun: updated, not duplicated.
    count = reopened.scene.GetNumberOfNodes()
    panel.parameters.nodules = reopened.scene.GetFirstNodeByName("nodules")
    panel.parameters.device, panel.parameters.perScale = "cpu", True
    panel.apply()
    assert reopened.scene.GetNumberOfNodes() == count


def test_cancel_half_way_leaves_the_scene_as_it_was(app, small_chest):
    image, nodules = small_chest
    panel, params, _ = panel_on(app, image, nodules, device="cpu")
    before = app.scene.GetNumberOfNodes()
    seen = []
    output = panel.apply(progress=lambda *step: seen.append(step), should_cancel=lambda: len(seen) >= 1)
    assert output is None and panel.output is None and params.resultsTable is None
    assert seen == [(0, 2, nodules[0][0])]
    assert app.scene.GetNumberOfNodes() == before


def test_the_slice_views_follow_the_nodule_being_computed(app, small_chest):
    from M3NetSlicerLib.headless import OffscreenViews

    image, nodules = small_chest
    views = OffscreenViews(app.scene, app.application_logic, size=32)
    panel, params, _ = panel_on(app, image, nodules, device="cpu")
    heights = []

    def progress(done, total, label):
        if label:
            heights.append(views.slice_node("Red").GetSliceToRAS().GetElement(2, 3))

    panel.apply(progress=progress)
    assert heights == pytest.approx([lps[2] for _, lps in nodules], abs=1e-3)


def test_rerun_with_fewer_points_removes_what_the_first_run_made(app, small_chest):
    image, nodules = small_chest
    panel, params, _ = panel_on(app, image, nodules, device="cpu")
    panel.apply()
    ct = params.inputVolume
    assert len(scene_outputs.outputs(app.scene, ct.GetID(), "heatmap-surface")) == 2
    params.nodules.RemoveNthControlPoint(1)
    output = panel.apply()
    assert [n.label for n in output.nodules] == [nodules[0][0]]
    for role in ("heatmap", "heatmap-surface"):
        assert len(scene_outputs.outputs(app.scene, ct.GetID(), role)) == 1
    assert panel.nodule_titles() == [f"{nodules[0][0]}: {output.nodules[0].probability:.2f} "
                                     f"({output.nodules[0].prediction})"]  # fmt: skip


def test_load_demo_gives_a_ct_and_two_points_ready_to_apply(app):
    checks = DependencyChecks()
    params = PanelParameters(device="cpu")
    panel = PanelController(app.scene, params, ensure_dependencies=checks)
    volume, points = panel.load_demo()
    assert checks.calls == 1
    assert params.inputVolume is volume and params.nodules is points
    assert points.GetNumberOfDefinedControlPoints() == 2
    assert volume.GetImageData().GetDimensions() == (256, 256, 160)
    assert panel.apply_state()[0]


def test_model_header_is_read_without_loading_and_bad_files_say_so(tmp_path, other_model_file):
    header = read_model_header(other_model_file)
    assert header["name"] == "other-model" and header["version"] == "9.9"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "short.safetensors").write_bytes(b"ab")
    for name in ("junk", "short"):
        with pytest.raises(ValueError):
            read_model_header(tmp_path / f"{name}.safetensors")
    panel = PanelController(slicer.vtkMRMLScene(), PanelParameters(), ensure_dependencies=DependencyChecks())
    panel.set_model_path(tmp_path / "junk.safetensors")
    assert panel.model_card().startswith("**Not an M3Net model file:**")


def test_panel_parameters_mirror_the_modules_parameter_node():
    """The controller's fields are the parameter node's (read from the module's source)."""
    tree = ast.parse((MODULE_DIR / "M3NetSlicer.py").read_text())
    (wrapper,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "M3NetSlicerParameterNode"]
    fields = [n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)]
    assert fields == [f.name for f in dataclasses.fields(PanelParameters)]


def test_the_widget_only_wires_signals():
    """No widget method grows past a screen: decisions belong in the controller."""
    tree = ast.parse((MODULE_DIR / "M3NetSlicer.py").read_text())
    (widget,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "M3NetSlicerWidget"]
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert max(lengths.values()) <= 40, lengths
    assert "modelPath = \"\"" not in ast.unparse(widget)  # the file's path is never cleared behind the user's back
