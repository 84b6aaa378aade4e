"""A small registry of model architectures: name -> constructor, config and input spec."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from m3netcore.crops import Preprocessing, ScaleSpec, default_preprocessing
from m3netcore.models.m3net import M3Net, M3NetConfig
from m3netcore.models.resnet import ResNet18x3, ResNet18x3Config, SingleScaleConfig, SingleScaleNet


@dataclass(frozen=True)
class ArchitectureEntry:
    """One registered architecture.

    Attributes:
        name: the registry key (``build_model(name)``).
        description: one line for ``m3net model-info``.
        model_class: the ``nn.Module`` class; it takes one config instance.
        default_config: the frozen config dataclass instance it is built with by default.
        preprocessing: a function returning the input spec (views, HU window) it expects.
        explainable: whether Grad-CAM maps of its ``cam_layers`` line up with the input
            grid (each feature cell the centre of a block of input voxels). Padded strided
            convolutions and max-pools shift the cells, so such models give no heatmaps.
    """

    name: str
    description: str
    model_class: type[nn.Module]
    default_config: object
    preprocessing: Callable[[], Preprocessing]
    explainable: bool = True


def _single_scale(name: str) -> Callable[[], Preprocessing]:
    def preprocessing() -> Preprocessing:
        full = default_preprocessing()
        return dataclasses.replace(full, scales=(full.scale(name),))

    return preprocessing


def _authors_input_sizes() -> Preprocessing:
    # The authors crop 32x32x56, 64x64x56 and 96x96x56 raw voxels (x, y, z); here the same
    # grids are sampled at 1 mm in physical space so the baseline sees every scanner alike.
    return Preprocessing(
        scales=(
            ScaleSpec("micro", (32.0, 32.0, 56.0), (32, 32, 56)),
            ScaleSpec("meso", (64.0, 64.0, 56.0), (64, 64, 56)),
            ScaleSpec("macro", (96.0, 96.0, 56.0), (96, 96, 56)),
        )
    )


_ENTRIES = [
    ArchitectureEntry(
        "m3net",
        "M3Net: micro/meso/macro encoders, shared latent projections (InfoNCE), macro-queried scale attention",
        M3Net,
        M3NetConfig(),
        default_preprocessing,
    ),
    ArchitectureEntry(
        "resnet18x3",
        "three 3D ResNet-18 encoders (64 base channels), late fusion: the authors' public code's shape",
        ResNet18x3,
        ResNet18x3Config(),
        _authors_input_sizes,
        explainable=False,
    ),
]
for _scale in ("micro", "meso", "macro"):
    _ENTRIES.append(
        ArchitectureEntry(
            f"single-{_scale}",
            f"one M3Net encoder on the {_scale} view only (ablation)",
            SingleScaleNet,
            SingleScaleConfig(scale_name=_scale),
            _single_scale(_scale),
        )
    )
def _without(name: str) -> Callable[[], Preprocessing]:
    def preprocessing() -> Preprocessing:
        full = default_preprocessing()
        return dataclasses.replace(full, scales=tuple(s for s in full.scales if s.name != name))

    return preprocessing


for _scale in ("micro", "meso", "macro"):
    _kept = tuple(s for s in ("micro", "meso", "macro") if s != _scale)
    _ENTRIES.append(
        ArchitectureEntry(
            f"m3net-no-{_scale}",
            f"M3Net without the {_scale} view (ablation)",
            M3Net,
            M3NetConfig(scale_names=_kept, query_scale="macro" if "macro" in _kept else "meso"),
            _without(_scale),
        )
    )
ARCHITECTURES: dict[str, ArchitectureEntry] = {entry.name: entry for entry in _ENTRIES}


def architecture(name: str) -> ArchitectureEntry:
    """The registry entry for ``name``; raises ``ValueError`` listing the known names."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def config_from_dict(name: str, values: dict | None) -> object:
    """The architecture's config, with ``values`` (e.g. read from a model file) over its defaults."""
    entry = architecture(name)
    if not values:
        return entry.default_config
    fields = {f.name for f in dataclasses.fields(entry.default_config)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"unknown config field(s) for {name}: {sorted(unknown)}")
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return dataclasses.replace(entry.default_config, **coerced)


def build_model(name: str, config: dict | None = None) -> nn.Module:
    """An untrained network of a registered architecture.

    Args:
        name: one of :data:`ARCHITECTURES` (``"m3net"``, ``"resnet18x3"``, ``"single-micro"``, ...).
        config: field values that override the architecture's default config.

    Raises:
        ValueError: unknown name or config field.
    """
    entry = architecture(name)
    network = entry.model_class(config_from_dict(name, config))
    network.architecture_name = name
    return network
