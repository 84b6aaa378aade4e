"""LIDC-phantom: the real LIDC nodules drawn into generated lung, a SEMI-SYNTHETIC benchmark set.

Every clustered LIDC nodule's consensus mask (its readers' real outlines: shape, size,
lobulation, spiculation) is drawn at its scan's own pixel spacing and slice spacing into
generated lung: parenchymal texture, vessels, a chest wall where the nodule's real
position in the scan lies near the edge of a lung, CT noise and slice-thickness blur.
Only what a CT shows sets the nodule's intensities, from the readers' ratings of it:

* texture (1 ground glass .. 5 solid) -> density from -700 to +40 HU;
* internal structure (1 soft tissue, 2 fluid, 3 fat, 4 air) -> the core's HU;
* calcification (1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent);
* margin (1 poorly defined .. 5 sharp) -> how soft the edge is.

Malignancy and subtlety (ratings that summarise a judgement) are never read here; the
label is the readers' real malignancy rating. Deterministic for a seed.
"""

from __future__ import annotations

import statistics
import zlib

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from m3netcore.crops import Preprocessing, ScaleSpec, sample_scale
from m3netcore.data.lidc import Nodule
from m3netcore.data.synthetic import (
    LUNG_HU,
    SOFT_TISSUE_HU,
    draw_segment,
    point_segment_distance,
    soft_step,
    unit_vector,
)

TEXTURE_LATTICE_MM = 4.0
NOISE_HU = 20.0
SCAN_FIELD_OF_VIEW_PIXELS = 512  # LIDC slices are 512 x 512


def nodule_appearance(nodule: Nodule) -> dict:
    """The CT-visible properties the phantom draws, from the readers' ratings (never malignancy)."""
    ratings = nodule.ratings
    texture = float(np.mean(ratings["texture"]))
    calcification = int(statistics.median_low(ratings["calcification"]))
    return {
        "density_hu": -700.0 + (texture - 1.0) / 4.0 * 740.0,
        "internal_structure": int(statistics.median_low(ratings["internalStructure"])),
        "calcification": calcification,
        "edge_mm": 0.3 + (5.0 - float(np.mean(ratings["margin"]))) / 4.0 * 1.5,
    }


def render_nodule_cubes(
    nodule: Nodule,
    specs: tuple[ScaleSpec, ...],
    preprocessing: Preprocessing,
    seed: int,
) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """The phantom's pyramid cubes (HU) for one nodule, and its centre in the phantom's LPS.

    The phantom's scan grid is the real scan's: x = column * pixel spacing, y = row *
    pixel spacing, z = the scan's first slice + k * its slice spacing (identity
    orientation), which are the real slice positions of every evenly sliced scan. The finest views
    are sampled from a region rendered at that grid; the largest from the same scene
    rendered at 1.5 mm, with the fine region pasted in.
    """
    # zlib.crc32, not hash(): Python salts str hashes per process, which would break determinism.
    rng = np.random.default_rng([seed, zlib.crc32(nodule.nodule_id.encode())])
    scan = nodule.scan
    spacing = np.array([scan.pixel_spacing_mm, scan.pixel_spacing_mm, scan.slice_spacing_mm])
    column, row, z_mm = nodule.centre_pixel
    centre = np.array([column * spacing[0], row * spacing[1], z_mm])
    largest = max(specs, key=lambda s: max(s.field_of_view_mm))
    fine_specs = [s for s in specs if s is not largest]
    fine_half = max(max(s.field_of_view_mm) for s in fine_specs) / 2 + 4.0
    scene = _Scene(rng, nodule, centre, spacing, largest_half_mm=max(largest.field_of_view_mm) / 2 + 6.0)

    fine = scene.render_fine(fine_half)
    coarse = scene.render_coarse(1.5)
    pasted = sitk.Resample(fine, coarse, sitk.Transform(), sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    merged = sitk.GetArrayFromImage(pasted)
    background = sitk.GetArrayViewFromImage(coarse)
    merged = np.where(np.isnan(merged), background, merged)
    macro_image = sitk.GetImageFromArray(merged.astype(np.float32))
    macro_image.CopyInformation(coarse)

    cubes = {}
    for spec in specs:
        source = macro_image if spec is largest else fine
        cubes[spec.name] = sample_scale(source, centre, spec, preprocessing.outside_hu)
    return cubes, tuple(float(v) for v in centre)


class _Scene:
    """One nodule's generated surroundings, defined in physical space so any grid can sample it."""

    def __init__(self, rng, nodule: Nodule, centre: np.ndarray, spacing: np.ndarray, largest_half_mm: float):
        self.rng = rng
        self.nodule = nodule
        self.centre = centre
        self.spacing = spacing
        self.half = largest_half_mm
        self.appearance = nodule_appearance(nodule)
        lattice = int(np.ceil(2 * largest_half_mm / TEXTURE_LATTICE_MM)) + 2
        self.texture = torch.from_numpy(rng.normal(0.0, 1.0, (lattice,) * 3).astype(np.float32))[None, None]
        self.radius_mm = nodule.diameter_mm / 2
        self.wall = self._chest_wall()
        self.vessels = [self._vessel() for _ in range(int(rng.integers(6, 13)))]

    def _chest_wall(self):
        """A chest-wall plane where the nodule's real place in its 512 x 512 slice is near a lung's edge.

        The lungs are two ellipses in the slice (the usual layout); the distance from the
        nodule to the nearer ellipse's edge, measured in mm, places the wall.
        """
        column, row, _ = self.nodule.centre_pixel
        pixel = self.nodule.scan.pixel_spacing_mm
        size = SCAN_FIELD_OF_VIEW_PIXELS
        best = None
        for side in (-1, 1):
            cx, cy, ax, ay = size / 2 + side * size * 0.225, size * 0.5, size * 0.19, size * 0.3
            dx, dy = (column - cx) / ax, (row - cy) / ay
            radial = np.hypot(dx, dy)
            gap_mm = (1.0 - radial) * min(ax, ay) * pixel
            if best is None or gap_mm > best[0]:
                direction = np.array([dx * ay, dy * ax, 0.0])
                best = (gap_mm, direction / (np.linalg.norm(direction) or 1.0))
        gap_mm, normal = best
        clearance = self.radius_mm + 1.0
        if gap_mm > 40.0:  # beyond the macro view's reach
            return None
        return normal, max(gap_mm, clearance)

    def _vessel(self):
        for _ in range(30):
            start = self.centre + self.rng.uniform(-self.half, self.half, 3)
            end = start + unit_vector(self.rng) * self.rng.uniform(40.0, 120.0)
            if point_segment_distance(self.centre, start, end) > self.radius_mm + 2.5:
                return start, end, float(self.rng.uniform(0.6, 2.5))
        return None

    def _axes(self, half_mm: float, spacing: np.ndarray, anchor: np.ndarray) -> tuple[np.ndarray, ...]:
        """Voxel-centre coordinates (z, y, x) of a box around the centre, on the lattice
        ``anchor + k * spacing`` (for the fine box: the scan's pixels and its first slice)."""
        axes = []
        for k in (2, 1, 0):
            first = np.floor((self.centre[k] - half_mm - anchor[k]) / spacing[k])
            last = np.ceil((self.centre[k] + half_mm - anchor[k]) / spacing[k])
            axes.append(anchor[k] + np.arange(first, last + 1) * spacing[k])
        return tuple(axes)

    @property
    def _scan_anchor(self) -> np.ndarray:
        """Where the scan's lattice has index 0: pixel (0, 0) of its first slice."""
        return np.array([0.0, 0.0, float(self.nodule.scan.z_positions_mm[0])])

    def _background(self, axes: tuple[np.ndarray, ...]) -> np.ndarray:
        zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
        volume = LUNG_HU + self._texture_at(axes)
        if self.wall is not None:
            normal, distance = self.wall
            depth = (xx - self.centre[0]) * normal[0] + (yy - self.centre[1]) * normal[1] - distance
            volume += soft_step(depth, 1.0) * (SOFT_TISSUE_HU - volume)
        for vessel in self.vessels:
            if vessel is not None:
                start, end, radius = vessel
                draw_segment(volume, axes, start, end, radius, None)
        return volume

    def _texture_at(self, axes) -> np.ndarray:
        lattice = self.texture.shape[-1]
        extent = (lattice - 1) * TEXTURE_LATTICE_MM / 2
        grids = [torch.from_numpy(((a - self.centre[2 - i]) / extent).astype(np.float32)) for i, a in enumerate(axes)]
        zz, yy, xx = torch.meshgrid(*grids, indexing="ij")
        sampled = F.grid_sample(self.texture, torch.stack([xx, yy, zz], -1)[None], align_corners=True)
        return sampled[0, 0].numpy() * 25.0

    def render_fine(self, half_mm: float) -> sitk.Image:
        """The region around the nodule on the scan's own voxel lattice, nodule drawn, CT effects applied."""
        axes = self._axes(half_mm, self.spacing, self._scan_anchor)
        volume = self._background(axes)
        fraction, hu = self._nodule_fields(axes)
        volume += fraction * (hu - volume)
        # Slice-thickness blur: a Gaussian along z with FWHM = slice thickness.
        sigma = self.nodule.scan.slice_thickness_mm / 2.355 / self.spacing[2]
        volume = _gaussian_1d(volume, sigma, axis=0)
        volume += self.rng.normal(0.0, NOISE_HU, volume.shape)
        return _image(volume, axes, self.spacing)

    def render_coarse(self, spacing_mm: float) -> sitk.Image:
        spacing = np.full(3, spacing_mm)
        axes = self._axes(self.half, spacing, self.centre)
        volume = self._background(axes)
        scale = np.sqrt(np.prod(self.spacing) / spacing_mm**3)
        volume += self.rng.normal(0.0, NOISE_HU * scale, volume.shape)
        return _image(volume, axes, spacing)

    def _nodule_fields(self, axes) -> tuple[np.ndarray, np.ndarray]:
        """Where the nodule is (soft 0..1, from the consensus mask) and its HU there."""
        from scipy import ndimage

        nodule, scan = self.nodule, self.nodule.scan
        shape = tuple(a.size for a in axes)
        mask = np.zeros(shape, dtype=np.float32)
        # The fine box is on the scan's lattice: find the mask's offset in it. A scan with
        # uneven slices places the mask's first slice at the lattice slice nearest its z.
        anchor = self._scan_anchor
        first = [int(round((axes[i][0] - anchor[2 - i]) / self.spacing[2 - i])) for i in range(3)]
        slice0 = int(round((scan.z_positions_mm[nodule.mask_origin[0]] - anchor[2]) / self.spacing[2]))
        origin = (slice0, nodule.mask_origin[1], nodule.mask_origin[2])
        start = [o - f for o, f in zip(origin, first, strict=True)]
        region = tuple(slice(max(s, 0), min(s + n, size)) for s, n, size in zip(start, nodule.mask.shape, shape,
                                                                                strict=True))
        source = tuple(slice(r.start - s, r.stop - s) for r, s in zip(region, start, strict=True))
        mask[region] = nodule.mask[source]
        look = self.appearance
        edge_voxels = [look["edge_mm"] / s for s in self.spacing[::-1]]
        fraction = ndimage.gaussian_filter(mask, sigma=[0.0, edge_voxels[1] / 2, edge_voxels[2] / 2])
        hu = np.full(shape, look["density_hu"], dtype=np.float32)
        inner = ndimage.binary_erosion(mask > 0, iterations=2)
        core_hu = {1: None, 2: 10.0, 3: -100.0, 4: -900.0}.get(look["internal_structure"])
        if core_hu is not None:
            hu[inner] = core_hu
        hu = self._calcify(hu, mask > 0, inner)
        return np.clip(fraction, 0.0, 1.0), hu

    def _calcify(self, hu: np.ndarray, inside: np.ndarray, inner: np.ndarray) -> np.ndarray:
        kind = self.appearance["calcification"]
        if kind >= 6 or not inside.any():
            return hu
        points = np.argwhere(inside)
        centre = points.mean(axis=0)
        distance = np.sqrt((((points - centre) * self.spacing[::-1]) ** 2).sum(axis=1))
        radius = max(float(distance.max()), 1.0)
        if kind == 3:  # solid
            chosen = np.ones(len(points), dtype=bool)
        elif kind == 5:  # central
            chosen = distance <= 0.45 * radius
        elif kind == 2:  # laminated: a ring
            chosen = np.abs(distance - 0.6 * radius) <= 0.12 * radius
        elif kind == 4:  # non-central: an eccentric blob
            anchor = points[self.rng.integers(len(points))]
            chosen = np.sqrt((((points - anchor) * self.spacing[::-1]) ** 2).sum(axis=1)) <= 0.35 * radius
        else:  # popcorn: a few small blobs
            chosen = np.zeros(len(points), dtype=bool)
            for anchor in points[self.rng.integers(len(points), size=4)]:
                chosen |= np.sqrt((((points - anchor) * self.spacing[::-1]) ** 2).sum(axis=1)) <= 0.2 * radius
        hu[tuple(points[chosen].T)] = 450.0
        return hu


def _image(volume: np.ndarray, axes, spacing: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin((float(axes[2][0]), float(axes[1][0]), float(axes[0][0])))
    return image


def _gaussian_1d(volume: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    if sigma < 0.2:
        return volume
    from scipy import ndimage

    return ndimage.gaussian_filter1d(volume, sigma, axis=axis, mode="nearest")
