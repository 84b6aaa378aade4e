"""Micro, meso and macro views of a nodule, sampled in physical space.

Each scale is a cube of fixed physical size (its field of view) centred on the nodule
and sampled on a fixed grid, so a 0.6 mm scanner and a 2.5 mm scanner give the network
the same anatomy at the same voxel size. Outside the CT is air. The crop is never shifted
to stay inside the volume: the nodule is always at the centre.

Example:
    >>> spec = default_preprocessing()
    >>> crops = extract_crops(ct_image, (-35.2, 12.0, -140.5), spec)  # LPS mm
    >>> crops["micro"].shape
    (32, 32, 32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from m3netcore.geometry import CropGrid

SCALE_NAMES = ("micro", "meso", "macro")


@dataclass(frozen=True)
class ScaleSpec:
    """One view: a physical field of view sampled on a fixed grid.

    Args:
        name: "micro", "meso", "macro" (or another label for baselines).
        field_of_view_mm: extent along x, y, z in mm.
        grid: voxels along x, y, z.
        antialias: when the view's voxels are coarser than the CT's, average the CT over
            blocks of about one view voxel before interpolating (a box filter), so a coarse
            view does not alias fine CT detail and every scanner gives the same signal.
    """

    name: str
    field_of_view_mm: tuple[float, float, float]
    grid: tuple[int, int, int]
    antialias: bool = True

    def __post_init__(self) -> None:
        if len(self.field_of_view_mm) != 3 or min(self.field_of_view_mm) <= 0:
            raise ValueError(f"field_of_view_mm must be 3 positive numbers, got {self.field_of_view_mm}")
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be 3 positive integers, got {self.grid}")

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(f / n for f, n in zip(self.field_of_view_mm, self.grid, strict=True))

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` = ``(z, y, x)`` of the crop array."""
        return tuple(int(n) for n in self.grid[::-1])

    def grid_at(self, center_lps: Sequence[float]) -> CropGrid:
        return CropGrid(
            center_lps=tuple(float(c) for c in center_lps),
            size=tuple(int(n) for n in self.grid),
            spacing_mm=self.spacing_mm,
        )


@dataclass(frozen=True)
class Preprocessing:
    """Everything between a CT in HU and the network's input; stored in every model file.

    Args:
        scales: the views, in the model's input order.
        hu_window: HU clipped to this range, then scaled linearly to [0, 1].
        outside_hu: the value of samples outside the CT (air).
    """

    scales: tuple[ScaleSpec, ...]
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    outside_hu: float = -1000.0

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("preprocessing needs at least one scale")
        names = [s.name for s in self.scales]
        if len(set(names)) != len(names):
            raise ValueError(f"scale names must be unique, got {names}")
        low, high = self.hu_window
        if not low < high:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")

    @property
    def scale_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.scales)

    def scale(self, name: str) -> ScaleSpec:
        for spec in self.scales:
            if spec.name == name:
                return spec
        raise KeyError(f"no scale named {name!r}; scales are {self.scale_names}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        scales = tuple(
            ScaleSpec(
                name=str(s["name"]),
                field_of_view_mm=tuple(float(v) for v in s["field_of_view_mm"]),
                grid=tuple(int(v) for v in s["grid"]),
                antialias=bool(s.get("antialias", True)),
            )
            for s in data["scales"]
        )
        return cls(
            scales=scales,
            hu_window=tuple(float(v) for v in data["hu_window"]),
            outside_hu=float(data["outside_hu"]),
        )


def default_preprocessing() -> Preprocessing:
    """DESIGN.md's defaults: 24/48/96 mm cubes on 32^3 grids (0.75, 1.5, 3 mm voxels)."""
    return Preprocessing(
        scales=(
            ScaleSpec("micro", (24.0, 24.0, 24.0), (32, 32, 32)),
            ScaleSpec("meso", (48.0, 48.0, 48.0), (32, 32, 32)),
            ScaleSpec("macro", (96.0, 96.0, 96.0), (32, 32, 32)),
        )
    )


def sample_scale(
    image: sitk.Image, center_lps: Sequence[float], spec: ScaleSpec, outside_hu: float = -1000.0
) -> np.ndarray:
    """Resample one view of ``image`` around an LPS point; returns HU as ``[z, y, x]`` float32."""
    grid = spec.grid_at(center_lps)
    source = image
    if spec.antialias:
        source = _box_filtered_region(image, grid, outside_hu)
        if source is None:  # the whole view lies outside the CT
            return np.full(spec.tensor_shape, outside_hu, dtype=np.float32)
    resampled = sitk.Resample(
        source, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, float(outside_hu), sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(resampled)


def normalise_hu(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Clip HU to the window and scale to [0, 1] (no per-patch statistics)."""
    low, high = hu_window
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def extract_crops(
    image: sitk.Image, center_lps: Sequence[float], preprocessing: Preprocessing
) -> dict[str, np.ndarray]:
    """All views of one point, normalised to [0, 1], keyed by scale name, in model order."""
    return {
        spec.name: normalise_hu(
            sample_scale(image, center_lps, spec, preprocessing.outside_hu), preprocessing.hu_window
        )
        for spec in preprocessing.scales
    }


def _box_filtered_region(image: sitk.Image, grid: CropGrid, outside_hu: float) -> sitk.Image | None:
    """The part of ``image`` under ``grid``, averaged over blocks up to one grid voxel wide.

    Blocks span an odd number of CT voxels along the CT's own axes (any direction matrix)
    and their lattice is anchored on the CT voxel nearest the grid's centre, so the result
    is the same whichever way the CT is stored (flipped rows give the same values). Voxels
    beyond the CT count as ``outside_hu``. The blocks form an ordinary image with its own
    geometry, which the caller interpolates. Returns ``image`` itself when no axis needs
    averaging, ``None`` when the grid does not touch the image.
    """
    image_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    ratio = min(grid.spacing_mm) / image_spacing
    # The largest odd number of CT voxels not wider than a view voxel: interpolating between
    # block centres adds a tent of one block, so wider blocks would blur beyond the view's voxel.
    widths = 2 * np.floor(np.maximum(ratio - 1.0, 0.0) / 2.0 + 1e-6).astype(int) + 1
    if np.all(widths == 1):
        return image
    half = widths // 2
    origin = np.asarray(grid.origin_lps)
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing_mm)
    corners = np.asarray(
        [
            image.TransformPhysicalPointToContinuousIndex((origin + np.asarray(corner) * extent).tolist())
            for corner in np.ndindex(2, 2, 2)
        ]
    )
    anchor = np.round(image.TransformPhysicalPointToContinuousIndex(grid.center_lps)).astype(int)
    # Block lattice: block starts are anchor - half + k * width; one block of margin each side.
    needed_low = np.floor(corners.min(axis=0)).astype(int) - widths
    needed_high = np.ceil(corners.max(axis=0)).astype(int) + widths + 1
    low = anchor - half - widths * np.ceil((anchor - half - needed_low) / widths).astype(int)
    high = low + widths * np.ceil((needed_high - low) / widths).astype(int)
    size = np.asarray(image.GetSize())
    clipped_low, clipped_high = np.clip(low, 0, size), np.clip(high, 0, size)
    if np.any(clipped_high <= clipped_low):
        return None
    padded = np.full(tuple((high - low)[::-1]), outside_hu, dtype=np.float32)
    offset = (clipped_low - low)[::-1]
    region = sitk.GetArrayViewFromImage(image)[
        clipped_low[2] : clipped_high[2], clipped_low[1] : clipped_high[1], clipped_low[0] : clipped_high[0]
    ]
    padded[
        offset[0] : offset[0] + region.shape[0],
        offset[1] : offset[1] + region.shape[1],
        offset[2] : offset[2] + region.shape[2],
    ] = region
    kernel = tuple(int(w) for w in widths[::-1])
    blocks = F.avg_pool3d(torch.from_numpy(padded)[None, None], kernel, stride=kernel)[0, 0].numpy()
    filtered = sitk.GetImageFromArray(blocks)
    filtered.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((low + half).astype(float).tolist()))
    filtered.SetSpacing((image_spacing * widths).tolist())
    filtered.SetDirection(image.GetDirection())
    return filtered
