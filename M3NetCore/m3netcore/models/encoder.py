"""The small scale-specific 3D CNN that M3Net gives each view."""

from __future__ import annotations

from torch import Tensor, nn

from m3netcore.models.blocks import conv_bn_relu


class ScaleEncoder(nn.Module):
    """A 3D CNN that turns one ``(B, 1, 32, 32, 32)`` view into a feature vector.

    It downsamples early with a non-overlapping ``patch``-voxel stem (as a ViT patchifies),
    then keeps that resolution through the stages, so the last stage (the one Grad-CAM
    reads) is ``32 / patch`` voxels a side: 8^3 for the default 4-voxel stem.

    Args:
        stem_width: channels after the patchifying stem.
        widths: channels of each 3x3x3 stage after the stem; the last one is ``out_dim``.
        patch: stem kernel and stride in voxels.
    """

    def __init__(self, stem_width: int = 24, widths: tuple[int, ...] = (32, 48), patch: int = 4) -> None:
        super().__init__()
        if stem_width < 1 or not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive, got stem_width={stem_width}, widths={widths}")
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.stem = nn.Sequential(
            nn.Conv3d(1, stem_width, patch, stride=patch, bias=False),
            nn.BatchNorm3d(stem_width),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_channels = stem_width
        for width in widths[:-1]:
            stages.append(conv_bn_relu(in_channels, width))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        # The last stage is its own attribute so Grad-CAM can hook it by name.
        self.last_stage = conv_bn_relu(in_channels, widths[-1])
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_dim = widths[-1]

    def forward_map(self, x: Tensor) -> Tensor:
        """The last stage's feature map ``(B, out_dim, d, h, w)``."""
        return self.last_stage(self.stages(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_map(x)).flatten(1)
