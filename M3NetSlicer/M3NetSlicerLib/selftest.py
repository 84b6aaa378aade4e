"""The module's self-test, without Qt, so that it runs the same in Slicer and under pytest.

On the extension build machines Slicer runs the test with ``--testing`` and nothing from
PyPI is installed there, torch included. The test then checks what needs no torch (the
model registry and cards, the panel's decisions on a real scene) and says that it skipped
*Apply*; it never installs anything. Where the dependencies are present it also runs
*Apply* end to end on a generated chest CT and checks the table and the heatmap nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from M3NetSlicerLib import dependencies, scene_outputs
from M3NetSlicerLib.panel import PanelController, PanelParameters, bundled_models


class SelfTestFailure(AssertionError):
    """A check of the self-test did not hold."""


@dataclass
class SelfTestReport:
    passed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run(
    scene,
    *,
    testing: bool,
    missing: Callable[[], list[str]] | None = None,
    ensure_dependencies: Callable[[], object] | None = None,
    log: Callable[[str], None] = print,
) -> SelfTestReport:
    """Run the self-test in ``scene`` (cleared first); raises :class:`SelfTestFailure` on a failed check.

    Args:
        testing: Slicer runs with ``--testing`` (nothing may be installed).
        missing: the missing Python packages (default: :func:`dependencies.missing_all`).
        ensure_dependencies: installs what is missing after asking; used only when not testing.
        log: progress messages.
    """
    report = SelfTestReport()
    scene.Clear(False)
    _check_without_torch(scene, report)
    absent = (missing or dependencies.missing_all)()
    if absent and (testing or ensure_dependencies is None):
        message = f"Apply skipped: missing Python packages {', '.join(absent)} (nothing is installed under --testing)"
        log(message)
        report.skipped.append(message)
        return report
    if absent:
        ensure_dependencies()
    _check_apply(scene, report, log)
    return report


def _check_without_torch(scene, report: SelfTestReport) -> None:
    names = bundled_models()
    _expect("demo" in names and "lidc-phantom" in names, f"bundled models listed: {names}")
    params = PanelParameters()
    calls = []
    panel = PanelController(scene, params, ensure_dependencies=lambda: calls.append(1))
    for name in names:
        panel.set_model_source(name)
        card = panel.model_card()
        _expect(name in card and "Not an M3Net model" not in card, f"model card of {name!r} readable")
    panel.set_model_path("/nonexistent/other-computer/model.safetensors")
    _expect("not found on this computer" in panel.model_card(), "a missing model file is named, not loaded")
    _expect(not panel.apply_state()[0], "Apply is off while the model file is missing")
    panel.set_model_source("demo")
    _expect(panel.model_to_run() == "demo", "switching back to the bundled model runs it")
    heatmap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    heatmap.SetAttribute(scene_outputs.ROLE, "heatmap")
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    _expect(panel.default_input_volume() is ct, "outputs are never picked as the CT")
    _expect(panel.hidden_input_ids() == [heatmap.GetID()], "outputs are hidden from the CT selector")
    _expect(not calls, "no dependency check before Apply")
    scene.Clear(False)
    report.passed.append("panel decisions without torch")


def _check_apply(scene, report: SelfTestReport, log) -> None:
    import m3netcore

    params = PanelParameters(device="cpu")
    panel = PanelController(scene, params, ensure_dependencies=lambda: None, log=log)
    log("Generating a chest CT with two nodules")
    volume, points = panel.load_demo()
    output = panel.apply()
    _expect(output is not None and output.table_node.GetNumberOfRows() == 2, "two rows in the results table")
    heatmaps = panel.logic().outputs(volume.GetID(), "heatmap")
    _expect(len(heatmaps) == 2, f"two heatmap volumes (found {len(heatmaps)})")
    from M3NetSlicerLib.convert import control_points, image_from_volume_node

    image = image_from_volume_node(volume)
    model = panel.logic().load_model("demo")
    expected = m3netcore.predict(model, image, [lps for _, lps in control_points(points)], explain=False, device="cpu")
    for nodule, reference in zip(output.nodules, expected, strict=True):
        _expect(abs(nodule.probability - reference.probability) < 1e-4, f"{nodule.label}: same as m3netcore.predict")
    count = scene.GetNumberOfNodes()
    panel.apply()
    _expect(scene.GetNumberOfNodes() == count, "Apply again updates the same nodes")
    restored = scene_outputs.restore(scene, volume)
    _expect(restored is not None and [n.label for n in restored.nodules] == [n.label for n in output.nodules],
            "results are found again from the scene")  # fmt: skip
    report.passed.append("Apply on a generated CT")


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise SelfTestFailure(f"self-test: {what}: failed")
