"""Every decision the module's panel makes, without Qt: the widget only wires signals here.

Which model will run (a bundled model or a file, never a stale path), when the Python
dependencies are checked (only on *Apply* or *Load demo CT*, never when the module opens
or a scene loads), which nodes may be chosen as the CT (never M3Net's own outputs), what
the model card says (read from the model file's header: no torch, no code executed),
and how the results of a saved scene are found and shown again.

The panel's state is the parameter node (``M3NetSlicerParameterNode`` in the module);
:class:`PanelParameters` has the same fields, for scripts and tests.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from M3NetSlicerLib import display, scene_outputs
from M3NetSlicerLib.scene_outputs import RunOutput

FILE_SOURCE = "file"
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a model file's JSON header; real ones are tens of kB


@dataclass
class PanelParameters:
    """The panel's state; the fields of the module's parameter node, with the same names.

    modelSource: a bundled model's name or ``"file"``; empty in scenes saved by versions
    that had no such field (then a non-empty modelPath means "file").
    """

    inputVolume: object = None
    nodules: object = None
    modelSource: str = ""
    modelPath: str = ""
    device: str = "auto"
    perScale: bool = False
    opacity: float = 0.5
    threshold: float = 0.2
    resultsTable: object = None


class PanelController:
    """The panel's decisions on a scene and its parameters.

    Args:
        scene: the MRML scene.
        parameters: the parameter node (or a :class:`PanelParameters`).
        ensure_dependencies: makes torch and the core importable (asks before
            installing); raises if it cannot. Called only when a network must run.
        make_logic: builds the ``M3NetLogic`` once the dependencies are there.
        log: status messages for the user.
    """

    def __init__(
        self,
        scene,
        parameters,
        *,
        ensure_dependencies: Callable[[], object],
        make_logic: Callable[[], object] | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.scene = scene
        self.parameters = parameters
        self._ensure_dependencies = ensure_dependencies
        self._make_logic = make_logic
        self._log = log
        self._logic = None
        self.output: RunOutput | None = None

    # -- the model ------------------------------------------------------------------------------

    def model_sources(self) -> list[tuple[str, str]]:
        """``(key, title)`` of every choice: each bundled model, then a model file."""
        return [(name, f"Bundled model: {name}") for name in bundled_models()] + [(FILE_SOURCE, "Model file...")]

    def model_source(self) -> str:
        """The chosen source; scenes of older versions (no source saved) are read as they meant it."""
        source = self.parameters.modelSource
        if source == FILE_SOURCE or source in bundled_models():
            return source
        return FILE_SOURCE if self.parameters.modelPath else "demo"

    def set_model_source(self, key: str) -> None:
        """Choose a bundled model or the file; the file's path is kept for switching back."""
        if key not in dict(self.model_sources()):
            raise ValueError(f"unknown model source {key!r}; known: {', '.join(k for k, _ in self.model_sources())}")
        self.parameters.modelSource = key

    def set_model_path(self, path) -> None:
        self.parameters.modelPath = str(path or "").strip()
        self.parameters.modelSource = FILE_SOURCE

    def path_box_visible(self) -> bool:
        return self.model_source() == FILE_SOURCE

    def model_to_run(self) -> str | None:
        """What *Apply* would load: a bundled model's name or a file path; None if no file is chosen."""
        source = self.model_source()
        if source != FILE_SOURCE:
            return source
        return self.parameters.modelPath or None

    def model_card(self) -> str:
        """The chosen model's card (markdown), read from its file's header without torch."""
        source = self.model_source()
        if source == FILE_SOURCE:
            path = self.parameters.modelPath
            if not path:
                return "Choose a model file made by `m3net train` (.safetensors)."
            if not Path(path).is_file():
                return f"**Model file not found on this computer:** `{path}`"
        else:
            path = bundled_model_path(source)
        try:
            header = read_model_header(path)
        except ValueError as err:
            return f"**Not an M3Net model file:** {err}"
        card = str(header.get("card") or "")
        return card or f"**{header.get('name', '?')}** {header.get('version', '?')} (no model card)"

    # -- inputs ---------------------------------------------------------------------------------

    def hidden_input_ids(self) -> list[str]:
        """IDs of volumes the *CT volume* selector must not offer: M3Net's own outputs."""
        return [node.GetID() for node in display.nodes_of_class(self.scene, "vtkMRMLScalarVolumeNode")
                if scene_outputs.is_output(node)]  # fmt: skip

    def default_input_volume(self):
        """The first scalar volume that is not an output, or None."""
        for node in display.nodes_of_class(self.scene, "vtkMRMLScalarVolumeNode"):
            if not scene_outputs.is_output(node):
                return node
        return None

    def apply_state(self) -> tuple[bool, str]:
        """Whether *Apply* can run, and the tooltip that says why (not)."""
        volume, points = self.parameters.inputVolume, self.parameters.nodules
        if volume is None:
            return False, "Select a CT volume."
        if scene_outputs.is_output(volume):
            return False, "The selected volume is an M3Net output; select the CT."
        if points is None or points.GetNumberOfDefinedControlPoints() == 0:
            return False, "Place at least one point on a nodule."
        model = self.model_to_run()
        if model is None:
            return False, "Choose a model file."
        if self.model_source() == FILE_SOURCE and not Path(model).is_file():
            return False, f"The model file {model} does not exist on this computer."
        return True, "Compute the malignancy probability, scale attention and heatmaps of every nodule point."

    # -- actions (these may import torch) --------------------------------------------------------

    def logic(self):
        """The ``M3NetLogic``, after the dependencies are checked (the first time only)."""
        if self._logic is None:
            self._ensure_dependencies()
            if self._make_logic is not None:
                self._logic = self._make_logic()
            else:
                from M3NetSlicerLib.logic import M3NetLogic

                self._logic = M3NetLogic(self.scene)
        return self._logic

    def apply(
        self,
        *,
        progress: Callable[[int, int, str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> RunOutput | None:
        """Run the chosen model on every placed point; None (and the scene unchanged) if cancelled.

        The slice views follow the nodule being computed.

        Raises:
            ValueError: *Apply* cannot run (the reason of :meth:`apply_state`).
            M3NetInputError / ModelFileError / DependencyError: from loading and running.
        """
        ready, reason = self.apply_state()
        if not ready:
            raise ValueError(reason)
        logic = self.logic()
        self._log("Loading the model...")
        model = logic.load_model(self.model_to_run())
        params = self.parameters
        positions = _defined_positions(params.nodules)

        def on_progress(done: int, total: int, label: str) -> None:
            if done < total and done < len(positions):
                scene_outputs.jump_to(self.scene, positions[done])
            if progress is not None:
                progress(done, total, label)

        output = logic.run(
            params.inputVolume,
            params.nodules,
            model,
            device=params.device,
            per_scale=bool(params.perScale),
            opacity=float(params.opacity),
            threshold=float(params.threshold),
            progress=on_progress,
            should_cancel=should_cancel,
        )
        if output is None:
            self._log("Cancelled: nothing was changed.")
            return None
        self.output = output
        params.resultsTable = output.table_node
        return output

    def load_demo(self):
        """Add the generated demo chest CT and its two nodule points, and choose them (no download)."""
        self.logic()  # the generator needs the core (torch)
        from m3netcore.data.synthetic import demo_ct
        from m3netcore.geometry import lps_to_ras
        from M3NetSlicerLib.convert import update_volume_node_from_image

        image, nodules = demo_ct(7)
        volume = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        volume.SetName("M3Net demo CT (generated)")
        update_volume_node_from_image(volume, image)
        volume.CreateDefaultDisplayNodes()
        volume.GetDisplayNode().SetAutoWindowLevel(False)
        volume.GetDisplayNode().SetWindowLevel(1500.0, -500.0)  # lung window
        points = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        points.SetName("M3Net demo nodules")
        for label, lps, _ in nodules:
            points.AddControlPoint(*lps_to_ras(lps), label)
        self.parameters.inputVolume = volume
        self.parameters.nodules = points
        self.output = None
        return volume, points

    # -- results ----------------------------------------------------------------------------------

    def restore(self) -> RunOutput | None:
        """The results the scene holds for the chosen CT (after a scene load or a CT change)."""
        self.output = scene_outputs.restore(self.scene, self.parameters.inputVolume)
        if self.output is not None:
            self.parameters.resultsTable = self.output.table_node
        return self.output

    def nodule_titles(self) -> list[str]:
        return scene_outputs.nodule_titles(self.output)

    def show(self, index: int, *, scale: str = "combined") -> None:
        """Show nodule ``index`` of the current results (nothing if there are none)."""
        if self.output is None or not 0 <= index < len(self.output.nodules):
            return
        params = self.parameters
        scene_outputs.show_nodule(
            self.scene,
            self.output,
            index,
            opacity=float(params.opacity),
            threshold=float(params.threshold),
            scale=scale,
        )

    def set_style(self, *, opacity: float, threshold: float) -> None:
        """The panel's sliders moved (their values are passed: the parameter node may lag)."""
        if self.parameters is None:  # no scene (closing): nothing to style
            return
        self.parameters.opacity = float(opacity)
        self.parameters.threshold = float(threshold)
        if self.output is not None:
            scene_outputs.set_heatmap_style(self.scene, self.output, opacity=opacity, threshold=threshold)

    def status_text(self, output: RunOutput, model_name: str = "") -> str:
        return f"{len(output.nodules)} nodule(s) on {output.device.upper() or '?'} in {output.seconds:.1f} s" + (
            f" with {model_name}." if model_name else "."
        )


# -- model files without torch ---------------------------------------------------------------------


def bundled_models() -> list[str]:
    """Names of the bundled models, from the core's registry file (the core is not imported)."""
    registry = _weights_folder() / "registry.json"
    try:
        return sorted(json.loads(registry.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


def bundled_model_path(name: str) -> Path:
    registry = json.loads((_weights_folder() / "registry.json").read_text(encoding="utf-8"))
    return _weights_folder() / registry[name]["file"]


def read_model_header(path) -> dict:
    """The JSON document of an M3Net model file's header (name, version, card, ...).

    Reads the safetensors header only: a length and a JSON text; no tensor, no code.

    Raises:
        ValueError: the file is missing, not a safetensors file, or has no M3Net metadata.
    """
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise ValueError(f"{path} is too short to be a model file")
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise ValueError(f"{path} is not a safetensors model file")
            text = handle.read(length)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        header = json.loads(text.decode("utf-8"))
        document = json.loads(header["__metadata__"]["m3net_model"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} holds no M3Net model metadata") from err
    if not isinstance(document, dict):
        raise ValueError(f"{path} holds no M3Net model metadata")
    return document


def _weights_folder() -> Path:
    spec = importlib.util.find_spec("m3netcore")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return Path("nonexistent")
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def _defined_positions(points_node) -> list[tuple[float, float, float]]:
    positions = []
    if points_node is None:
        return positions
    position = [0.0, 0.0, 0.0]
    for index in range(points_node.GetNumberOfControlPoints()):
        if points_node.GetNthControlPointPositionStatus(index) == points_node.PositionDefined:
            points_node.GetNthControlPointPositionWorld(index, position)
            positions.append(tuple(float(v) for v in position))
    return positions


__all__ = ["PanelController", "PanelParameters", "bundled_models", "read_model_header"]
