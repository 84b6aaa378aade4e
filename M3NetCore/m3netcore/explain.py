"""Per-scale Grad-CAM: where each scale's encoder looked, as images in physical space.

Grad-CAM (Selvaraju et al., ICCV 2017) weighs each channel of a layer's feature map by
the mean gradient of the target score over the map, sums, and keeps the positive part.
Here the layer is each encoder's last stage, the score is the malignancy logit signed
towards the predicted label (evidence for "malignant" when the model says malignant,
for "benign" when it says benign), and the map is brought back onto its scale's grid,
which is a cube in LPS around the nodule. The ``combined`` map adds the scales' maps,
each weighted by the model's attention to that scale, on one grid covering the largest
field of view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3netcore.crops import Preprocessing, ScaleSpec
from m3netcore.geometry import CropGrid, image_from_array

COMBINED_GRID = 64


class GradCAM:
    """Records the activations of named layers and their gradients; a context manager.

    Each recorded activation is made a leaf of the autograd graph and the gradients are
    taken with ``torch.autograd.grad``, so explaining costs a backward pass through the
    layers after the hooked ones (the fusion head) and touches no parameter's ``.grad``;
    :func:`gradcam` also freezes the parameters so the encoders record no graph at all.

    Args:
        layers: name -> module whose output is explained (``network.cam_layers()``).

    Example:
        >>> with GradCAM(network.cam_layers()) as cam:
        ...     out = network(crops)
        ...     maps = cam.maps(out.logit.sum())
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = dict(layers)
        self._activations: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> GradCAM:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._activations.clear()

    def maps(self, score: Tensor) -> dict[str, Tensor]:
        """Gradients of ``score``; per layer a ``(B, *spatial)`` Grad-CAM map scaled to peak 1."""
        missing = set(self.layers) - set(self._activations)
        if missing:
            raise RuntimeError(f"no forward pass recorded for {sorted(missing)}")
        names = list(self._activations)
        activations = [self._activations[name] for name in names]
        gradients = torch.autograd.grad(score, activations, allow_unused=True)
        result = {}
        for name, activation, gradient in zip(names, activations, gradients, strict=True):
            if gradient is None:  # the score does not depend on this scale
                gradient = torch.zeros_like(activation)
            spatial_axes = tuple(range(2, activation.ndim))
            weights = gradient.mean(dim=spatial_axes, keepdim=True)
            cam = F.relu((weights * activation).sum(dim=1)).detach()
            peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
            result[name] = cam / peak.view(-1, *([1] * (cam.ndim - 1)))
        return result

    def _recorder(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
            leaf = output.detach().requires_grad_(True)
            self._activations[name] = leaf
            return leaf

        return hook


@contextlib.contextmanager
def gradcam(network: nn.Module) -> Iterator[GradCAM]:
    """Grad-CAM on ``network.cam_layers()`` with the network's parameters frozen meanwhile."""
    flags = [(p, p.requires_grad) for p in network.parameters()]
    network.requires_grad_(False)
    try:
        with torch.enable_grad(), GradCAM(network.cam_layers()) as cam:
            yield cam
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def upsample_map(cam: Tensor, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize of a ``(B, d, h, w)`` map to ``(B, *shape)``, as numpy."""
    resized = F.interpolate(cam.unsqueeze(1).float(), size=tuple(shape), mode="trilinear", align_corners=False)
    return resized[:, 0].cpu().numpy()


def heatmap_images(
    cams: dict[str, np.ndarray],
    center_lps: Sequence[float],
    preprocessing: Preprocessing,
    attention: dict[str, float] | None,
) -> dict[str, sitk.Image]:
    """One nodule's per-scale maps (on their scale grids) as images, plus ``combined``."""
    images = {
        spec.name: image_from_array(cams[spec.name], spec.grid_at(center_lps)) for spec in preprocessing.scales
    }
    images["combined"] = combine_heatmaps(images, center_lps, preprocessing.scales, attention)
    return images


def combine_heatmaps(
    images: dict[str, sitk.Image],
    center_lps: Sequence[float],
    scales: Sequence[ScaleSpec],
    attention: dict[str, float] | None,
) -> sitk.Image:
    """Attention-weighted sum of the scales' maps on a grid over the largest field of view.

    Each map is zero outside its own field of view. The sum is scaled so its peak is 1.
    Without attention (late-fusion models) the scales weigh equally. The scales' grids are
    concentric and LPS-aligned, so each map is sampled with one scaled ``grid_sample``.
    """
    largest = np.asarray(max(scales, key=lambda s: np.prod(s.field_of_view_mm)).field_of_view_mm)
    grid = CropGrid(
        center_lps=tuple(float(c) for c in center_lps),
        size=(COMBINED_GRID,) * 3,
        spacing_mm=tuple(largest / COMBINED_GRID),
    )
    total = torch.zeros((COMBINED_GRID,) * 3)
    for spec in scales:
        weight = attention[spec.name] if attention else 1.0 / len(scales)
        volume = torch.from_numpy(sitk.GetArrayFromImage(images[spec.name]))[None, None]
        total += float(weight) * _resample_concentric(volume, largest / np.asarray(spec.field_of_view_mm))
    peak = float(total.max())
    if peak > 0:
        total /= peak
    return image_from_array(total.numpy(), grid)


def cams_on_grids(raw: dict[str, Tensor], preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """Resize each scale's raw Grad-CAM ``(B, d, h, w)`` to its crop grid ``(B, D, H, W)``."""
    return {spec.name: upsample_map(raw[spec.name], spec.tensor_shape) for spec in preprocessing.scales}


def signed_target(logit: Tensor, malignant: Tensor) -> Tensor:
    """The score Grad-CAM explains: each nodule's logit, towards its predicted label."""
    sign = torch.where(malignant, 1.0, -1.0).to(logit.dtype)
    return (sign * logit).sum()


def _resample_concentric(volume: Tensor, ratio_xyz: np.ndarray) -> Tensor:
    """Sample a ``(1, 1, d, h, w)`` map whose cube is ``1/ratio`` of the combined grid's, centred.

    When the map covers a whole, centred block of combined voxels (the default scales do)
    it is resized onto that block; otherwise it is sampled with ``grid_sample``. Outside
    its own field of view the map is 0.
    """
    extent = COMBINED_GRID / ratio_xyz[::-1]  # voxels of the combined grid, (z, y, x)
    block = np.round(extent).astype(int)
    margin = (COMBINED_GRID - block) // 2
    if np.allclose(extent, block) and np.all((COMBINED_GRID - block) % 2 == 0) and np.all(block >= 1):
        out = torch.zeros((COMBINED_GRID,) * 3)
        resized = F.interpolate(volume, size=tuple(block), mode="trilinear", align_corners=False)[0, 0]
        out[
            margin[0] : margin[0] + block[0], margin[1] : margin[1] + block[1], margin[2] : margin[2] + block[2]
        ] = resized
        return out
    axis = (torch.arange(COMBINED_GRID, dtype=torch.float32) + 0.5) / COMBINED_GRID * 2 - 1
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    unit = torch.stack([xx, yy, zz], dim=-1) * torch.as_tensor(ratio_xyz, dtype=torch.float32)
    return F.grid_sample(volume, unit[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]
