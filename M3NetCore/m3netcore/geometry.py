"""Points and grids in physical space.

Conventions, said once for the whole package:

* Points inside the core are LPS millimetres (DICOM/ITK patient coordinates). RAS appears
  only at the edges (the CLI's ``--coords ras``, Slicer) and is converted here.
* A crop grid is axis-aligned in LPS (identity direction), so the same physical
  neighbourhood gives the same array whatever the scanner's direction matrix or spacing.
* numpy arrays from SimpleITK are indexed ``[z, y, x]``; tensors are ``(B, C, D, H, W)``
  with ``D, H, W = z, y, x``. The one axis flip between SimpleITK and numpy happens in
  :func:`array_from_image` / :func:`image_from_array`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from m3netcore.errors import M3NetInputError

COORDINATE_SYSTEMS = ("LPS", "RAS")


def to_lps(points: Iterable[Sequence[float]], coords: str) -> np.ndarray:
    """Return points as an ``(N, 3)`` LPS array.

    Args:
        points: ``(x, y, z)`` millimetre triples in ``coords``.
        coords: ``"LPS"`` or ``"RAS"`` (case-insensitive). RAS and LPS differ by the sign
            of x and y.

    Raises:
        M3NetInputError: unknown coordinate system, or points that are not finite triples.
    """
    system = str(coords).upper()
    if system not in COORDINATE_SYSTEMS:
        raise M3NetInputError(f"coords must be 'LPS' or 'RAS', got {coords!r}")
    try:
        array = np.asarray([tuple(float(v) for v in p) for p in points], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise M3NetInputError(f"points must be (x, y, z) numbers, got {points!r}") from err
    if array.size == 0:
        raise M3NetInputError("no points given")
    if array.ndim != 2 or array.shape[1] != 3:
        raise M3NetInputError(f"each point needs exactly 3 coordinates, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise M3NetInputError("points contain NaN or infinite coordinates")
    if system == "RAS":
        array = array * np.array([-1.0, -1.0, 1.0])
    return array


def lps_to_ras(point_lps: Sequence[float]) -> tuple[float, float, float]:
    """Return an LPS point in RAS (the same flip, its own inverse)."""
    x, y, z = (float(v) for v in point_lps)
    return (-x, -y, z)


@dataclass(frozen=True)
class CropGrid:
    """An LPS-aligned sampling grid centred on a point.

    Attributes:
        center_lps: the grid's centre in LPS mm; it is the centre of the middle voxel
            for odd sizes and the corner shared by the middle voxels for even sizes.
        size: number of voxels along x, y, z (SimpleITK order).
        spacing_mm: voxel size along x, y, z.
    """

    center_lps: tuple[float, float, float]
    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @property
    def origin_lps(self) -> tuple[float, float, float]:
        """Centre of the first voxel (ITK's origin)."""
        return tuple(
            c - (n - 1) / 2.0 * s
            for c, n, s in zip(self.center_lps, self.size, self.spacing_mm, strict=True)
        )

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.size, self.spacing_mm, strict=True))

    def reference_image(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty image with this grid's geometry (for ``sitk.Resample``)."""
        image = sitk.Image([int(n) for n in self.size], pixel_type)
        image.SetSpacing([float(s) for s in self.spacing_mm])
        image.SetOrigin([float(o) for o in self.origin_lps])
        image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return image


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (min, max corners) of the image's voxel extent (voxel edges)."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    corners = []
    for ci in np.ndindex(2, 2, 2):
        index = np.where(np.asarray(ci) == 1, size - 0.5, -0.5)
        corners.append(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    corners = np.asarray(corners)
    return corners.min(axis=0), corners.max(axis=0)


def contains_point(image: sitk.Image, point_lps: Sequence[float]) -> bool:
    """Whether an LPS point lies inside the image's voxels (edges included)."""
    index = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps]))
    size = np.asarray(image.GetSize(), dtype=np.float64)
    return bool(np.all(index >= -0.5) and np.all(index <= size - 0.5))


def check_inside(image: sitk.Image, point_lps: Sequence[float]) -> None:
    """Raise :class:`M3NetInputError` naming the point and the image's extent if outside."""
    if contains_point(image, point_lps):
        return
    low, high = physical_bounds(image)
    ras = lps_to_ras(point_lps)
    raise M3NetInputError(
        "point LPS ({:.1f}, {:.1f}, {:.1f}) mm (RAS ({:.1f}, {:.1f}, {:.1f})) is outside the "
        "image, which spans LPS x {:.1f}..{:.1f}, y {:.1f}..{:.1f}, z {:.1f}..{:.1f} mm".format(
            *point_lps, *ras, low[0], high[0], low[1], high[1], low[2], high[2]
        )
    )


def array_from_image(image: sitk.Image) -> np.ndarray:
    """numpy view ordered ``[z, y, x]`` (a copy, as SimpleITK gives it)."""
    return sitk.GetArrayFromImage(image)


def image_from_array(array: np.ndarray, grid: CropGrid) -> sitk.Image:
    """Wrap a ``[z, y, x]`` array as an image on ``grid``."""
    if tuple(array.shape[::-1]) != tuple(grid.size):
        raise ValueError(f"array shape {array.shape} does not match grid size {grid.size}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(grid.reference_image())
    return image
