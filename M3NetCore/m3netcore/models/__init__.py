"""Model architectures and their registry."""

from m3netcore.models.m3net import M3Net, M3NetConfig
from m3netcore.models.output import ModelOutput
from m3netcore.models.registry import ARCHITECTURES, architecture, build_model, config_from_dict
from m3netcore.models.resnet import ResNet18x3, SingleScaleNet

__all__ = [
    "ARCHITECTURES",
    "M3Net",
    "M3NetConfig",
    "ModelOutput",
    "ResNet18x3",
    "SingleScaleNet",
    "architecture",
    "build_model",
    "config_from_dict",
]
