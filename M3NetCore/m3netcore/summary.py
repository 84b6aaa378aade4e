"""Size and cost of a model: parameters, FLOPs per nodule, input spec (``m3net model-info``)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from m3netcore.checkpoint import Model


def model_summary(model: Model) -> dict:
    """Parameters, GFLOPs for one nodule's forward pass, and what the model expects.

    FLOPs are counted by ``torch.utils.flop_counter`` on a batch of one: a multiply-add
    counts as two FLOPs (so GMACs are half of ``gflops``); convolutions and matrix
    products are counted, element-wise operations are not.
    """
    network = model.network.eval()
    device = next(network.parameters()).device
    crops = [torch.zeros(1, 1, *spec.tensor_shape, device=device) for spec in model.preprocessing.scales]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(crops)
    flops = counter.get_total_flops()
    return {
        "name": model.name,
        "version": model.version,
        "architecture": model.architecture,
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "inputs": [
            {
                "scale": spec.name,
                "field_of_view_mm": list(spec.field_of_view_mm),
                "grid_xyz": list(spec.grid),
                "spacing_mm": [round(s, 4) for s in spec.spacing_mm],
                "tensor_shape": [1, 1, *spec.tensor_shape],
            }
            for spec in model.preprocessing.scales
        ],
        "hu_window": list(model.preprocessing.hu_window),
        "outside_hu": model.preprocessing.outside_hu,
        "temperature": model.temperature,
        "threshold": model.threshold,
    }
