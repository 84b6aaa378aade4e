"""A model's network as ONNX: the views in, the logit and the scale attention out.

The ONNX graph is the network only. It takes one float32 input per scale, named by the
scale (``micro``, ``meso``, ``macro``), each ``(N, 1, D, H, W)`` (32^3 for the bundled
models): the HU-windowed crops of :func:`m3netcore.crops.extract_crops`, normalised to
[0, 1]. It returns ``logit`` ``(N,)`` before calibration and, for models that weigh scales,
``scale_attention`` ``(N, S)``. It does not cut the crops from a CT, apply the temperature
or threshold (both are in the file's metadata), or make Grad-CAM heatmaps: ``m3net predict``
does those.

Exported with the TorchScript exporter (``dynamo=False``): the dynamo exporter needs
``onnxscript``, and the TorchScript one gives the same graph for this network.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from m3netcore.checkpoint import Model, file_sha256
from m3netcore.errors import M3NetInputError

OPSET = 17


def export_onnx(model: Model, out: str | os.PathLike, *, opset: int = OPSET) -> dict:
    """Write ``model``'s network to ``out`` as ONNX; returns inputs, outputs, shapes and the file's sha256.

    Raises:
        M3NetInputError: ``out`` is a folder, or the ``onnx`` extra is not installed.
    """
    try:
        import onnx
    except ImportError as err:
        raise M3NetInputError("ONNX export needs the onnx package: pip install 'm3net-core[onnx]'") from err
    out = Path(out)
    if out.is_dir():
        raise M3NetInputError(f"--out {out} is a folder; give the .onnx file's path")
    names = list(model.preprocessing.scale_names)
    shapes = {spec.name: (1, 1, *spec.grid[::-1]) for spec in model.preprocessing.scales}
    network = _ViewsToOutputs(model.network.cpu().eval(), len(names))
    example = tuple(torch.zeros(shapes[name]) for name in names)
    with torch.no_grad():
        attention = model.network(list(example)).scale_attention is not None
    outputs = ["logit", "scale_attention"] if attention else ["logit"]
    network.with_attention = attention
    partial = out.with_name(out.name + ".partial")
    try:
        with warnings.catch_warnings():
            # math.sqrt(token width) in the attention is traced as a constant, which it is (a
            # fixed layer width): the tracer's warning about it is not for the user
            warnings.filterwarnings("ignore", message="Converting a tensor to a Python float",
                                    category=torch.jit.TracerWarning)  # fmt: skip
            torch.onnx.export(
                network, example, str(partial), input_names=names, output_names=outputs, opset_version=opset,
                dynamic_axes={name: {0: "nodules"} for name in (*names, *outputs)}, dynamo=False,
            )  # fmt: skip
        graph = onnx.load(str(partial))
        metadata = {
            "m3net_model": model.name, "m3net_version": model.version, "m3net_architecture": model.architecture,
            "temperature": repr(model.temperature), "threshold": repr(model.threshold),
            "preprocessing": json.dumps(model.preprocessing.to_dict()),
        }  # fmt: skip
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=str(value))
        onnx.checker.check_model(graph)
        onnx.save(graph, str(partial))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"inputs": names, "outputs": outputs, "shapes": shapes, "sha256": file_sha256(out)}


class _ViewsToOutputs(nn.Module):
    """The network with one tensor argument per scale and a tuple out (what the exporter traces)."""

    def __init__(self, network: nn.Module, scales: int) -> None:
        super().__init__()
        self.network = network
        self.scales = scales
        self.with_attention = True

    def forward(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.network(list(views))
        return (output.logit, output.scale_attention) if self.with_attention else (output.logit,)
