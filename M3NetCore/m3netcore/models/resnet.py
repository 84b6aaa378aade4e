"""Baselines: three 3D ResNet-18s with late fusion, and single-scale networks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from m3netcore.models.blocks import BasicBlock3d
from m3netcore.models.encoder import ScaleEncoder
from m3netcore.models.output import ModelOutput


class ResNet18Encoder3d(nn.Module):
    """3D ResNet-18 feature extractor (He et al., CVPR 2016; 3D form of Hara et al., CVPR 2018).

    A 7x7x7 stem with stride (1, 2, 2) and a max-pool, then four stages of two basic
    blocks with ``base_width * (1, 2, 4, 8)`` channels; this is the encoder shape of the
    M3Net authors' public code.

    Args:
        base_width: channels of the first stage (64 in ResNet-18).
    """

    def __init__(self, base_width: int = 64) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width}")
        widths = [base_width * m for m in (1, 2, 4, 8)]
        self.stem = nn.Sequential(
            nn.Conv3d(1, base_width, 7, stride=(1, 2, 2), padding=3, bias=False),
            nn.BatchNorm3d(base_width),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(3, stride=2, padding=1),
        )
        layers = []
        in_channels = base_width
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock3d(in_channels, width, stride), BasicBlock3d(width, width)))
            in_channels = width
        self.layers = nn.Sequential(*layers[:-1])
        self.last_stage = layers[-1]
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_dim = widths[-1]

    def forward_map(self, x: Tensor) -> Tensor:
        return self.last_stage(self.layers(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_map(x)).flatten(1)


@dataclass(frozen=True)
class ResNet18x3Config:
    """Args:
    scale_names: the three views.
    base_width: ResNet-18 base channels (64).
    """

    scale_names: tuple[str, ...] = ("micro", "meso", "macro")
    base_width: int = 64


class ResNet18x3(nn.Module):
    """Three ResNet-18 encoders, one per view, with late fusion of their features.

    The shape of the M3Net authors' public code (three separate ResNets whose outputs are
    combined at the end), kept as the heavy baseline for accuracy and speed.
    """

    def __init__(self, config: ResNet18x3Config | None = None) -> None:
        super().__init__()
        self.config = config or ResNet18x3Config()
        self.scale_names = tuple(self.config.scale_names)
        self.encoders = nn.ModuleDict({n: ResNet18Encoder3d(self.config.base_width) for n in self.scale_names})
        feature_dim = self.encoders[self.scale_names[0]].out_dim
        self.classifier = nn.Linear(feature_dim * len(self.scale_names), 1)

    def cam_layers(self) -> dict[str, nn.Module]:
        return {name: self.encoders[name].last_stage for name in self.scale_names}

    def forward_features(self, crops: Sequence[Tensor]) -> Tensor:
        if len(crops) != len(self.scale_names):
            raise ValueError(f"expected {len(self.scale_names)} views, got {len(crops)}")
        return torch.stack([self.encoders[n](x) for n, x in zip(self.scale_names, crops, strict=True)], dim=1)

    def forward_head(self, features: Tensor) -> ModelOutput:
        return ModelOutput(logit=self.classifier(features.flatten(1)).squeeze(-1))

    def forward(self, crops: Sequence[Tensor]) -> ModelOutput:
        return self.forward_head(self.forward_features(crops))


@dataclass(frozen=True)
class SingleScaleConfig:
    """Args:
    scale_name: the one view this network sees.
    stem_width, widths, patch: the :class:`ScaleEncoder`, as in M3Net.
    dropout: before the classifier.
    """

    scale_name: str = "micro"
    stem_width: int = 24
    widths: tuple[int, ...] = (32, 48)
    patch: int = 4
    dropout: float = 0.2


class SingleScaleNet(nn.Module):
    """One M3Net encoder and a classifier on one view: the per-scale ablation."""

    def __init__(self, config: SingleScaleConfig | None = None) -> None:
        super().__init__()
        self.config = config or SingleScaleConfig()
        cfg = self.config
        self.scale_names = (cfg.scale_name,)
        self.encoder = ScaleEncoder(cfg.stem_width, cfg.widths, cfg.patch)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(self.encoder.out_dim, 1)

    def cam_layers(self) -> dict[str, nn.Module]:
        return {self.config.scale_name: self.encoder.last_stage}

    def forward_features(self, crops: Sequence[Tensor]) -> Tensor:
        if len(crops) != 1:
            raise ValueError(f"expected 1 view, got {len(crops)}")
        return self.encoder(crops[0]).unsqueeze(1)

    def forward_head(self, features: Tensor) -> ModelOutput:
        logit = self.classifier(self.dropout(features[:, 0])).squeeze(-1)
        attention = torch.ones(features.shape[0], 1, device=features.device, dtype=features.dtype)
        return ModelOutput(logit=logit, scale_attention=attention)

    def forward(self, crops: Sequence[Tensor]) -> ModelOutput:
        return self.forward_head(self.forward_features(crops))
