"""One random spatial transform per nodule, applied alike to all of its stored cubes.

A training cache stores, per nodule and scale, a cube axis-aligned in LPS, centred on the
nodule and larger than the model's view (:mod:`m3netcore.data.cache`). A view is cut out
of it by resampling the model's grid through a transform in physical space, about the
nodule centre::

    p_cube_mm = matrix @ p_view_mm + shift_mm

``matrix`` = rotation @ flips * zoom. Because the transform is in millimetres, the same
one moves the micro, meso and macro views alike: the scales stay one view of one nodule.
The identity transform reproduces the crop that inference takes
(:func:`m3netcore.crops.extract_crops`) up to the cache's int16 rounding.

Example:
    >>> rng = np.random.default_rng(0)
    >>> drawn = draw_transform(rng, max_rotation_deg=25, flip=True, max_scale_change=0.1, max_shift_mm=2)
    >>> views = resample_views(cubes_hu, stored_specs, view_specs, drawn.matrix[None], drawn.shift_mm[None])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from m3netcore.crops import ScaleSpec


@dataclass(frozen=True)
class SpatialTransform:
    """A view transform about the nodule centre: ``p_cube = matrix @ p_view + shift_mm`` (LPS mm)."""

    matrix: np.ndarray  # (3, 3)
    shift_mm: np.ndarray  # (3,)

    @classmethod
    def identity(cls) -> SpatialTransform:
        return cls(np.eye(3), np.zeros(3))


def draw_transform(
    rng: np.random.Generator,
    *,
    max_rotation_deg: float,
    flip: bool,
    max_scale_change: float,
    max_shift_mm: float,
) -> SpatialTransform:
    """A random rotation about a uniformly random axis, optional flips, an isotropic zoom and a shift."""
    axis = rng.standard_normal(3)
    axis /= max(np.linalg.norm(axis), 1e-12)
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    flips = np.where(rng.random(3) < 0.5, -1.0, 1.0) if flip else np.ones(3)
    zoom = rng.uniform(1.0 - max_scale_change, 1.0 + max_scale_change)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    return SpatialTransform(rotation_matrix(axis, angle) @ np.diag(flips) * zoom, shift)


def rotation_matrix(unit_axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation by ``angle_rad`` about ``unit_axis`` (Rodrigues' formula)."""
    x, y, z = unit_axis
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + np.sin(angle_rad) * cross + (1.0 - np.cos(angle_rad)) * cross @ cross


def check_views_fit(stored: Sequence[ScaleSpec], views: Sequence[ScaleSpec]) -> None:
    """Refuse views that a cache cannot give: another voxel size, or a field of view beyond its cube."""
    for cube, view in zip(stored, views, strict=True):
        if not np.allclose(cube.spacing_mm, view.spacing_mm, rtol=1e-6):
            raise ValueError(
                f"the cache's {cube.name} cubes have {cube.spacing_mm} mm voxels; the model's {view.name} view "
                f"needs {view.spacing_mm} mm"
            )
        if any(v > c + 1e-6 for v, c in zip(view.field_of_view_mm, cube.field_of_view_mm, strict=True)):
            raise ValueError(
                f"the model's {view.name} view ({view.field_of_view_mm} mm) is larger than the cache's cube "
                f"({cube.field_of_view_mm} mm)"
            )


def resample_views(
    cubes_hu: Sequence[Tensor],
    stored: Sequence[ScaleSpec],
    views: Sequence[ScaleSpec],
    matrices: Tensor,
    shifts_mm: Tensor,
) -> list[Tensor]:
    """Cut each view out of its cube through the per-nodule transforms (trilinear).

    Args:
        cubes_hu: per scale, ``(B, 1, D, H, W)`` float HU cubes centred on the nodules.
        stored: the cubes' specs (grid and voxel size), in the same order.
        views: the model's view specs, in the same order.
        matrices: ``(B, 3, 3)``, LPS x/y/z.
        shifts_mm: ``(B, 3)``.

    Returns:
        Per scale, ``(B, 1, d, h, w)`` HU. Samples beyond the cube repeat its border (the CT
        goes on there; air would be wrong inside the body).
    """
    out = []
    for cube, cube_spec, view_spec in zip(cubes_hu, stored, views, strict=True):
        # Half-extents (centre of the first voxel to the centre) in mm; with align_corners=True,
        # normalised coordinate +-1 is the centre of the first/last voxel along each axis.
        view_half = [(n - 1) / 2 * s for n, s in zip(view_spec.grid, view_spec.spacing_mm, strict=True)]
        cube_half = [(n - 1) / 2 * s for n, s in zip(cube_spec.grid, cube_spec.spacing_mm, strict=True)]
        to_cube = torch.tensor(cube_half, dtype=cube.dtype, device=cube.device)
        linear = matrices.to(cube.dtype) * torch.tensor(view_half, dtype=cube.dtype, device=cube.device)
        linear = linear / to_cube[:, None]  # (B, 3 cube axes, 3 view axes)
        offset = shifts_mm.to(cube.dtype) / to_cube  # (B, 3)
        # The map is linear, so the grid is a sum of one term per view axis: two broadcast adds
        # instead of a (B, N, 4) x (4, 3) product, elementwise so that a nodule's grid does not
        # depend on its batch (GEMM blocking would), and grid_sample's (x, y, z) = (W, H, D) order.
        x, y, z = (_axis(n, cube.dtype, cube.device) for n in view_spec.grid)
        along_x = linear[:, None, None, None, :, 0] * x[None, None, None, :, None] + offset[:, None, None, None, :]
        along_y = linear[:, None, None, None, :, 1] * y[None, None, :, None, None]
        along_z = linear[:, None, None, None, :, 2] * z[None, :, None, None, None]
        grid = along_z + along_y + along_x  # (B, D, H, W, 3)
        out.append(F.grid_sample(cube, grid, mode="bilinear", padding_mode="border", align_corners=True))
    return out


def normalise_hu_tensor(hu: Tensor, hu_window: tuple[float, float], *, inplace: bool = False) -> Tensor:
    """Torch twin of :func:`m3netcore.crops.normalise_hu`: clip to the window, scale to [0, 1]."""
    low, high = hu_window
    if not inplace:
        return (hu.clamp(low, high) - low) / (high - low)
    return hu.clamp_(low, high).sub_(low).div_(high - low)


@functools.lru_cache(maxsize=16)
def _axis(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised coordinates (-1 .. 1) of ``size`` voxel centres along one axis."""
    return torch.linspace(-1.0, 1.0, size, dtype=torch.float64).to(dtype=dtype, device=device)


class NoiseBank:
    """Gaussian HU noise for many views, cut from a few stored fields.

    Drawing ``D x H x W`` normal numbers per view per step costs a sixth of a CPU training
    step. Instead ``fields`` unit-variance white-noise fields, half as large again as the
    view along each axis, are drawn once (from ``seed``); a view's noise is a window of one
    of them at a random offset, scaled by the nodule's standard deviation. A window of white
    Gaussian noise is white Gaussian noise, so each view still gets independent
    N(0, std^2) voxels; windows of different views may overlap, which augmentation does not mind.
    ``stream`` separates the banks of different scales, so that one nodule's views never share noise.
    """

    def __init__(self, shape: tuple[int, int, int], seed: int, device: torch.device, *, stream: int = 0,
                 fields: int = 8) -> None:  # fmt: skip
        rng = np.random.default_rng([seed, 0x401_5E, stream, *shape])
        self.shape = shape
        self.room = tuple(n // 2 + 1 for n in shape)  # offsets 0 .. n // 2 along each axis
        bank = (fields, *(n + r - 1 for n, r in zip(shape, self.room, strict=True)))
        self.fields = torch.from_numpy(rng.standard_normal(bank, dtype=np.float32)).to(device)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One view's choice: ``(field, offset z, offset y, offset x)``."""
        return np.array([rng.integers(len(self.fields)), *(rng.integers(r) for r in self.room)], dtype=np.int64)

    def add_to(self, views: Tensor, choices: np.ndarray, std: Sequence[float]) -> None:
        """Add each view's noise in place: ``views`` ``(B, 1, D, H, W)``, ``choices`` ``(B, 4)``, ``std`` ``(B,)``."""
        d, h, w = self.shape
        for view, (field, z, y, x), sigma in zip(views, choices.tolist(), std, strict=True):
            view[0].add_(self.fields[field, z : z + d, y : y + h, x : x + w], alpha=float(sigma))
