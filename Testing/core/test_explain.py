"""Grad-CAM: heatmaps land where the evidence is, in physical space; hooks are cleaned up."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

import m3netcore as m3
from m3netcore.checkpoint import Model
from m3netcore.crops import default_preprocessing
from m3netcore.explain import GradCAM, gradcam
from m3netcore.models.output import ModelOutput


class EvidenceNet(nn.Module):
    """The logit sums each view's (pooled) intensity: Grad-CAM must light up the bright voxels."""

    architecture_name = "m3net"

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.scale_names = ("micro", "meso", "macro")
        self.stages = nn.ModuleDict(
            {n: nn.Sequential(nn.AvgPool3d(pool), nn.Conv3d(1, 2, 1)) for n in self.scale_names}
        )
        for stage in self.stages.values():
            nn.init.constant_(stage[1].weight, 1.0)
            nn.init.zeros_(stage[1].bias)

    def cam_layers(self):
        return dict(self.stages)

    def forward(self, crops):
        maps = [self.stages[n](x) for n, x in zip(self.scale_names, crops, strict=True)]
        logit = sum(m.mean(dim=(1, 2, 3, 4)) for m in maps)
        attention = torch.full((crops[0].shape[0], 3), 1 / 3)
        return ModelOutput(logit=logit, scale_attention=attention)


def ct_with_sphere(center_lps, direction, spacing=(0.8, 0.9, 1.5), size=(96, 96, 72)):
    """Air with one bright sphere (r = 3 mm) at ``center_lps``; geometry set before drawing."""
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    middle = [(n - 1) / 2 for n in size]
    offset = np.asarray(image.TransformContinuousIndexToPhysicalPoint(middle))
    image.SetOrigin(tuple(-offset))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    matrix = np.asarray(direction).reshape(3, 3) * np.asarray(spacing)
    physical = index @ matrix.T + np.asarray(image.GetOrigin())
    inside = np.linalg.norm(physical - np.asarray(center_lps), axis=1) <= 3.0
    array = np.where(inside, 600, -1000).astype(np.int16).reshape(size).transpose(2, 1, 0)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def heatmap_peak_lps(heatmap: sitk.Image) -> np.ndarray:
    values = sitk.GetArrayFromImage(heatmap).astype(np.float64)
    weights = np.where(values >= 0.5 * values.max(), values, 0.0)
    zyx = np.stack(np.nonzero(weights), axis=1)
    centroid_zyx = (zyx * weights[tuple(zyx.T)][:, None]).sum(0) / weights.sum()
    return np.asarray(heatmap.TransformContinuousIndexToPhysicalPoint(centroid_zyx[::-1].tolist()))


OBLIQUE = tuple(np.linalg.qr(np.array([[0.9, -0.3, 0.2], [0.35, 0.85, -0.1], [-0.1, 0.2, 0.95]]))[0].ravel())


@pytest.mark.parametrize("pool", [1, 4])
@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), OBLIQUE])
def test_heatmaps_put_the_evidence_at_its_physical_place(pool, direction):
    sphere = np.array([5.0, -4.0, 3.0])  # LPS mm, off the click so axis mix-ups show
    image = ct_with_sphere(sphere, direction)
    model = Model(EvidenceNet(pool), "m3net", default_preprocessing())
    (result,) = m3.predict(model, image, [(0.0, 0.0, 0.0)], device="cpu")
    assert result.label == "malignant"
    # A half-voxel slip of the upsampling (align_corners, nearest) moves the micro peak by
    # about 0.7 mm; the right mapping keeps it within a few tenths.
    assert np.linalg.norm(heatmap_peak_lps(result.heatmaps["micro"]) - sphere) < 0.45
    assert np.linalg.norm(heatmap_peak_lps(result.heatmaps["combined"]) - sphere) < 1.0
    assert np.linalg.norm(heatmap_peak_lps(result.heatmaps["meso"]) - sphere) < 1.0 * pool


def test_upsampled_feature_cell_is_centred_on_its_block_of_voxels():
    from m3netcore.explain import upsample_map

    cam = torch.zeros(1, 8, 8, 8)
    cam[0, 2, 5, 6] = 1.0  # cell (z, y, x) = (2, 5, 6) covers voxels 4 * cell .. 4 * cell + 3
    upsampled = upsample_map(cam, (32, 32, 32))[0]
    zyx = np.stack(np.nonzero(upsampled > 0), axis=1)
    centroid = (zyx * upsampled[tuple(zyx.T)][:, None]).sum(0) / upsampled.sum()
    np.testing.assert_allclose(centroid, [4 * 2 + 1.5, 4 * 5 + 1.5, 4 * 6 + 1.5], atol=0.05)


def test_models_whose_maps_do_not_line_up_refuse_to_explain():
    image = ct_with_sphere(np.zeros(3), (1, 0, 0, 0, 1, 0, 0, 0, 1), size=(24, 24, 24))
    baseline = m3.build_model("resnet18x3")
    with pytest.raises(m3.M3NetInputError, match="no heatmaps.*explain=False"):
        m3.predict(baseline, image, [(0.0, 0.0, 0.0)], device="cpu", explain=True)


def test_gradcam_removes_hooks_and_leaves_parameters_untouched():
    torch.manual_seed(0)
    network = m3.build_model("m3net").eval()
    flags_before = [p.requires_grad for p in network.parameters()]
    views = [torch.rand(2, 1, 32, 32, 32) for _ in range(3)]
    with gradcam(network) as cam:
        output = network(views)
        maps = cam.maps(output.logit.sum())
    assert set(maps) == {"micro", "meso", "macro"}
    for heatmap in maps.values():
        assert heatmap.shape == (2, 8, 8, 8)
        assert float(heatmap.min()) >= 0.0 and float(heatmap.max()) <= 1.0 + 1e-6
    assert all(not m._forward_hooks for m in network.modules())
    assert [p.requires_grad for p in network.parameters()] == flags_before
    assert all(p.grad is None for p in network.parameters())


def test_maps_without_a_forward_pass_is_an_error():
    network = m3.build_model("single-micro")
    with GradCAM(network.cam_layers()) as cam, pytest.raises(RuntimeError, match="no forward pass"):
        cam.maps(torch.zeros((), requires_grad=True))


def test_combined_map_weighs_scales_by_attention():
    from m3netcore.explain import combine_heatmaps
    from m3netcore.geometry import image_from_array

    preprocessing = default_preprocessing()
    center = (1.0, 2.0, 3.0)
    images = {
        spec.name: image_from_array(np.full(spec.tensor_shape, 1.0, np.float32), spec.grid_at(center))
        for spec in preprocessing.scales
    }
    combined = combine_heatmaps(images, center, preprocessing.scales, {"micro": 0.0, "meso": 0.0, "macro": 1.0})
    values = sitk.GetArrayFromImage(combined)
    assert values.min() == pytest.approx(1.0) and values.max() == pytest.approx(1.0)
    micro_only = combine_heatmaps(images, center, preprocessing.scales, {"micro": 1.0, "meso": 0.0, "macro": 0.0})
    values = sitk.GetArrayFromImage(micro_only)
    # micro covers the central 24 of 96 mm: 16 of 64 voxels a side
    assert values[32, 32, 32] == pytest.approx(1.0)
    assert values[32, 32, 10] == 0.0 and values[10, 32, 32] == 0.0
    assert np.count_nonzero(values > 0.5) == pytest.approx(16**3, rel=0.15)
    assert np.allclose(combined.GetOrigin(), np.asarray(center) - (63 / 2) * 1.5)
