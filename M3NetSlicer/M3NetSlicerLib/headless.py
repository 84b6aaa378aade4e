"""A Slicer application without the GUI: a scene, the module logics, offscreen views.

Used where there is no ``slicer.app``: the tests (``slicer-core`` wheel) and the batch
script under plain Python. Inside the Slicer application the batch script uses the
application's scene and logics instead, and only :class:`OffscreenViews` from here. With
``--no-main-window`` the application has no slice or view logics at all (Slicer makes
them only for the main window's layout): :class:`OffscreenViews` then gives the
application logic the collections it lacks, and makes its own views.

Rendering needs an OpenGL that works without a display: EGL (Mesa llvmpipe on CPUs).
:func:`rendering_available` probes it in a child process, because VTK crashes the whole
process when no OpenGL can be loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

THREE_D_MANAGERS = (
    "vtkMRMLCameraDisplayableManager",
    "vtkMRMLViewDisplayableManager",
    "vtkMRMLModelDisplayableManager",
    "vtkMRMLVolumeRenderingDisplayableManager",
    "vtkMRMLMarkupsDisplayableManager",
)
SLICE_VIEWS = ("Red", "Yellow", "Green")


@dataclass
class HeadlessApplication:
    """A scene with the application logic and the module logics M3Net uses."""

    scene: object = None
    application_logic: object = None
    logics: dict = field(default_factory=dict)

    @classmethod
    def create(cls) -> HeadlessApplication:
        scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetName("default")
        crosshair.SetSingletonTag("default")
        scene.AddNode(crosshair)
        app = slicer.vtkSlicerApplicationLogic()
        app.SetMRMLScene(scene)
        app.SetSliceLogics(vtk.vtkCollection())
        app.SetViewLogics(vtk.vtkCollection())
        slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app)
        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app)
        self = cls(scene=scene, application_logic=app)
        colours = slicer.vtkSlicerColorLogic()
        colours.SetMRMLApplicationLogic(app)  # before the scene, or the volumes logic finds no colours
        # The wheel ships no colour files, and the colour logic says so as an error on every
        # start ("FindDefaultColorFiles failed"); the built-in tables it adds are all M3Net uses.
        verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
        try:
            colours.SetMRMLScene(scene)
            app.SetModuleLogic("Colors", colours)
            colours.AddDefaultColorNodes()
        finally:
            vtk.vtkLogger.SetStderrVerbosity(verbosity)
        self.logics["Colors"] = colours
        for name, logic in (
            ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic()),
            ("Volumes", slicer.vtkSlicerVolumesLogic()),
            ("Markups", slicer.vtkSlicerMarkupsLogic()),
            ("Tables", slicer.vtkSlicerTablesLogic()),
            ("VolumeRendering", slicer.vtkSlicerVolumeRenderingLogic()),
        ):
            logic.SetMRMLApplicationLogic(app)  # first, as for colours: markups widgets need it
            logic.SetMRMLScene(scene)
            app.SetModuleLogic(name, logic)
            self.logics[name] = logic
        # The application sets its home at start-up; without one, markups and rulers warn
        # "Home directory is not set" on every render. Set after the colours, which would
        # otherwise look for colour files that the wheel does not ship.
        app.SetHomeDirectory(os.path.dirname(slicer.__file__))
        return self

    @property
    def volume_rendering_logic(self):
        return self.logics["VolumeRendering"]


class OffscreenViews:
    """The three slice views and one 3D view, rendered to numpy RGB arrays.

    Slice views need no OpenGL (the slice logic blends the layers); the 3D view does.
    """

    def __init__(self, scene, application_logic, *, size: int = 512) -> None:
        self.scene = scene
        self.size = size
        self.slice_logics = {}
        # ``Slicer --no-main-window`` never calls setLayoutManager, the one place that gives the
        # application logic its slice and view logics: they are None there.
        if application_logic.GetSliceLogics() is None:
            application_logic.SetSliceLogics(vtk.vtkCollection())
        if application_logic.GetViewLogics() is None:
            application_logic.SetViewLogics(vtk.vtkCollection())
        for name in SLICE_VIEWS:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(scene)
            logic.SetMRMLApplicationLogic(application_logic)
            node = logic.AddSliceNode(name)
            node.SetDimensions(size, size, 1)
            application_logic.GetSliceLogics().AddItem(logic)
            self.slice_logics[name] = logic
        self.slice_logics["Red"].GetSliceNode().SetOrientationToAxial()
        self.slice_logics["Yellow"].GetSliceNode().SetOrientationToSagittal()
        self.slice_logics["Green"].GetSliceNode().SetOrientationToCoronal()
        self._application_logic = application_logic
        self._window = None

    def slice_node(self, name: str = "Red"):
        return self.slice_logics[name].GetSliceNode()

    def fit_slice(self, name: str, field_of_view_mm: float) -> None:
        """Zoom slice view ``name`` so it shows ``field_of_view_mm`` across."""
        node = self.slice_node(name)
        node.SetFieldOfView(field_of_view_mm, field_of_view_mm, node.GetFieldOfView()[2])
        node.UpdateMatrices()

    def capture_slice(self, name: str = "Red") -> np.ndarray:
        """The slice view as an ``(H, W, 3)`` uint8 array, top row first."""
        producer = self.slice_logics[name].GetImageDataConnection().GetProducer()
        producer.Update()
        return _rgb(producer.GetOutputDataObject(0))

    def capture_3d(self, *, azimuth: float = 30.0, elevation: float = 20.0, zoom: float = 1.0) -> np.ndarray:
        """The 3D view as an ``(H, W, 3)`` uint8 array (camera reset on the visible data)."""
        self._ensure_3d()
        renderer = self._renderer
        renderer.ResetCamera()
        camera = renderer.GetActiveCamera()
        camera.Azimuth(azimuth)
        camera.Elevation(elevation)
        camera.Zoom(zoom)
        renderer.ResetCameraClippingRange()
        self._window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self._window)
        grab.ReadFrontBufferOff()
        grab.Update()
        return _rgb(grab.GetOutput())

    def _ensure_3d(self) -> None:
        if self._window is not None:
            return
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.SetSize(self.size, self.size)
        renderer = vtk.vtkRenderer()
        window.AddRenderer(renderer)
        interactor = vtk.vtkRenderWindowInteractor()  # the displayable managers crash without one
        interactor.SetRenderWindow(window)
        interactor.Initialize()
        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        if factory.GetMRMLApplicationLogic() is None:
            factory.SetMRMLApplicationLogic(self._application_logic)
        # Without a 3D view widget the application registers only the modules' managers
        # (volume rendering, markups), not the model, camera and view managers.
        for manager in THREE_D_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        view_logic = slicer.vtkMRMLViewLogic()
        view_logic.SetMRMLScene(self.scene)
        view_logic.SetMRMLApplicationLogic(self._application_logic)
        view_node = view_logic.AddViewNode("1")
        view_node.SetBoxVisible(False)
        view_node.SetAxisLabelsVisible(False)
        self._application_logic.GetViewLogics().AddItem(view_logic)
        group = slicer.vtkMRMLDisplayableManagerGroup()
        group.Initialize(factory, renderer)
        group.SetMRMLDisplayableNode(view_node)
        self._window, self._renderer, self._interactor = window, renderer, interactor
        self._group, self._view_logic, self.view_node = group, view_logic, view_node


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    """Write an ``(H, W, 3)`` uint8 array (top row first) as PNG, atomically."""
    from m3netcore.atomic import atomic_path

    height, width = rgb.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    flat = np.ascontiguousarray(rgb[::-1]).reshape(-1, rgb.shape[2])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    with atomic_path(path) as temporary:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(temporary))
        writer.SetInputData(image)
        writer.Write()


def rendering_available(timeout: float = 60.0) -> tuple[bool, str]:
    """Whether an offscreen 3D render works here, tried in a child process (VTK may crash)."""
    probe = (
        "import os; os.environ.setdefault('VTK_DEFAULT_OPENGL_WINDOW', 'vtkEGLRenderWindow');"
        "import vtk; w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8);"
        "w.AddRenderer(vtk.vtkRenderer()); w.Render(); print(w.GetClassName())"
    )
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "the offscreen OpenGL probe timed out"
    if done.returncode != 0:
        return False, (
            f"no offscreen OpenGL (exit {done.returncode}); install Debian's libegl1 libegl-mesa0 libgl1-mesa-dri"
        )
    return True, done.stdout.strip()


def _rgb(image_data) -> np.ndarray:
    width, height, _ = image_data.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    pixels = scalars.reshape(height, width, -1)[::-1, :, :3]
    return np.ascontiguousarray(pixels)


__all__ = ["HeadlessApplication", "OffscreenViews", "rendering_available", "write_png"]
