"""Generated chest CT and nodules: the demo's CT and the demo model's training data.

Everything is drawn in physical space (mm) from a seeded ``numpy.random.Generator``, so a
seed gives the same image on every machine. The nodules follow the textbook signs a
radiologist reads, as a rule that makes a learnable, *synthetic* label: malignant ones
are larger, lobulated and spiculated with a soft margin, sometimes part-solid; benign ones
are small, smooth and sharp-edged, often calcified. These images are not CT of patients
and the label is this rule, not pathology.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

AIR_HU = -1000.0
LUNG_HU = -850.0
SOFT_TISSUE_HU = 40.0
BONE_HU = 700.0


@dataclass(frozen=True)
class NoduleAppearance:
    """How one nodule looks. ``malignant`` is the synthetic label, never read by rendering."""

    diameter_mm: float
    solid_hu: float
    margin_mm: float  # width of the edge blur: small is sharp
    lobulation: float  # relative radius change of the lobes
    lobe_directions: tuple[tuple[float, float, float], ...]
    spikes: tuple[tuple[float, float, float, float], ...]  # unit direction and length (mm)
    calcified: bool
    ground_glass_fraction: float  # outer fraction of the radius that is ground glass
    malignant: bool


def random_nodule(rng: np.random.Generator, malignant: bool) -> NoduleAppearance:
    """Draw a nodule's appearance from the synthetic rule for its label."""
    if malignant:
        diameter = rng.uniform(8.0, 26.0)
        lobulation = rng.uniform(0.1, 0.35)
        spike_count = int(rng.integers(4, 16)) if rng.random() < 0.8 else 0
        margin = rng.uniform(0.8, 1.6)
        calcified = rng.random() < 0.03
        ground_glass = rng.uniform(0.3, 0.6) if rng.random() < 0.3 else 0.0
    else:
        diameter = rng.uniform(4.0, 14.0)
        lobulation = rng.uniform(0.0, 0.08)
        spike_count = int(rng.integers(1, 3)) if rng.random() < 0.1 else 0
        margin = rng.uniform(0.2, 0.6)
        calcified = rng.random() < 0.5
        ground_glass = 0.0
    lobes = tuple(tuple(unit_vector(rng)) for _ in range(int(rng.integers(3, 7))))
    spikes = tuple((*unit_vector(rng), rng.uniform(0.3, 0.9) * diameter) for _ in range(spike_count))
    return NoduleAppearance(
        diameter_mm=float(diameter),
        solid_hu=float(rng.uniform(0.0, 60.0)),
        margin_mm=float(margin),
        lobulation=float(lobulation),
        lobe_directions=lobes,
        spikes=tuple(tuple(float(v) for v in s) for s in spikes),
        calcified=bool(calcified),
        ground_glass_fraction=float(ground_glass),
        malignant=malignant,
    )


def draw_nodule(
    volume: np.ndarray, axes_mm: tuple[np.ndarray, ...], center: np.ndarray, nodule: NoduleAppearance
) -> None:
    """Blend a nodule into ``volume`` (HU, ``[z, y, x]``) whose voxel centres are ``axes_mm``."""
    radius = nodule.diameter_mm / 2
    reach = radius * 2.2 + 3
    box = _box(axes_mm, center, reach)
    if box is None:
        return
    offset = _offsets(axes_mm, box, center)
    distance = np.sqrt(offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2) + 1e-6
    local_radius = np.full(distance.shape, radius)
    for direction in nodule.lobe_directions:
        cosine = (offset[0] * direction[0] + offset[1] * direction[1] + offset[2] * direction[2]) / distance
        local_radius += radius * nodule.lobulation * np.clip(cosine, 0, None) ** 4
    inside = soft_step(local_radius - distance, nodule.margin_mm)
    for *direction, length in nodule.spikes:
        start = np.asarray(direction) * radius * 0.8
        end = np.asarray(direction) * (radius + length)
        inside = np.maximum(inside, _capsule(offset, start, end, 0.7, 0.6) * 0.9)
    hu = np.full(distance.shape, nodule.solid_hu)
    if nodule.ground_glass_fraction > 0:
        core = soft_step(local_radius * (1 - nodule.ground_glass_fraction) - distance, 1.0)
        hu = -550.0 + core * (nodule.solid_hu + 550.0)
    if nodule.calcified:
        hu = hu + soft_step(radius * 0.55 - distance, 0.4) * 500.0
    region = volume[box]
    region[...] = region + inside * (hu - region)


def render_patch(
    rng: np.random.Generator,
    nodule: NoduleAppearance,
    size_mm: float = 100.0,
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> sitk.Image:
    """A box of lung around a nodule at the origin: parenchyma, vessels, maybe chest wall, noise.

    ``spacing_mm`` is (x, y, z), so patches can mimic a scanner's anisotropic voxels.
    """
    counts = [int(round(size_mm / s)) for s in spacing_mm]
    axes = tuple((np.arange(n) - (n - 1) / 2) * s for n, s in zip(counts[::-1], spacing_mm[::-1], strict=True))
    shape = tuple(counts[::-1])
    volume = LUNG_HU + _texture(rng, shape, 25.0)
    if rng.random() < 0.5:  # chest wall on one side, at a distance
        normal = unit_vector(rng)
        distance = rng.uniform(radius_clearance(nodule) + 4.0, 45.0)
        zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
        depth = xx * normal[0] + yy * normal[1] + zz * normal[2] - distance
        volume += soft_step(depth, 1.0) * (SOFT_TISSUE_HU - volume)
    for _ in range(int(rng.integers(4, 10))):
        _draw_vessel(volume, axes, rng, extent_mm=size_mm / 2, avoid_mm=radius_clearance(nodule))
    draw_nodule(volume, axes, np.zeros(3), nodule)
    volume += rng.normal(0.0, 15.0, volume.shape)
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing_mm))
    image.SetOrigin(tuple(float(axis[0]) for axis in axes[::-1]))
    return image


def radius_clearance(nodule: NoduleAppearance) -> float:
    return nodule.diameter_mm / 2 * (1 + nodule.lobulation) + max((s[3] for s in nodule.spikes), default=0.0)


def demo_ct(seed: int = 7) -> tuple[sitk.Image, list[tuple[str, tuple[float, float, float], NoduleAppearance]]]:
    """A generated chest CT (body, two lungs, vessels, spine) with a suspicious and a benign-looking nodule.

    Returns the image (int16 HU, 0.75 x 0.75 x 1.25 mm, LPS) and ``(label, LPS centre, appearance)``
    for each nodule.
    """
    rng = np.random.default_rng(seed)
    size = (256, 256, 160)  # x, y, z
    spacing = (0.75, 0.75, 1.25)
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(size, spacing, strict=True))
    axes = tuple((np.arange(n) * s + o) for n, s, o in zip(size[::-1], spacing[::-1], origin[::-1], strict=True))
    zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
    volume = np.full((size[2], size[1], size[0]), AIR_HU, dtype=np.float32)
    body = (xx / 92.0) ** 2 + (yy / 70.0) ** 2 <= 1.0
    volume = np.where(body, SOFT_TISSUE_HU, volume)
    lungs = np.zeros(volume.shape, dtype=bool)
    for side in (-1, 1):
        lungs |= ((xx - side * 40.0) / 32.0) ** 2 + ((yy + 2.0) / 50.0) ** 2 + (zz / 110.0) ** 2 <= 1.0
    volume = np.where(lungs, LUNG_HU + _texture(rng, volume.shape, 25.0), volume)
    spine = ((xx / 14.0) ** 2 + ((yy - 52.0) / 14.0) ** 2 <= 1.0) & np.ones_like(zz, dtype=bool)
    volume = np.where(spine, BONE_HU, volume)
    for side in (-1, 1):
        for _ in range(7):
            start = np.array([side * 18.0, rng.uniform(-10, 10), rng.uniform(-30, 30)])
            direction = np.array([side * rng.uniform(0.4, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.9)])
            direction /= np.linalg.norm(direction)
            end = start + direction * rng.uniform(40, 70)
            draw_segment(volume, axes, start, end, rng.uniform(1.5, 3.0), lungs)
    nodules = [
        ("N-1 suspicious", (-52.0, -18.0, 22.0), random_nodule(np.random.default_rng(seed + 1), malignant=True)),
        ("N-2 calcified", (44.0, 12.0, -35.0), _calcified_nodule(np.random.default_rng(seed + 2))),
    ]
    for _, center, nodule in nodules:
        draw_nodule(volume, axes, np.asarray(center, dtype=np.float64), nodule)
    volume += rng.normal(0.0, 12.0, volume.shape).astype(np.float32)
    image = sitk.GetImageFromArray(np.clip(np.round(volume), -1024, 3071).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image, nodules


def _calcified_nodule(rng: np.random.Generator) -> NoduleAppearance:
    nodule = random_nodule(rng, malignant=False)
    return NoduleAppearance(**{**nodule.__dict__, "calcified": True, "diameter_mm": 9.0, "spikes": ()})


def _draw_vessel(volume, axes, rng, extent_mm: float, avoid_mm: float) -> None:
    for _ in range(20):  # vessels pass by the nodule but do not run through its centre
        start = rng.uniform(-extent_mm, extent_mm, 3)
        end = start + unit_vector(rng) * rng.uniform(30, 90)
        if point_segment_distance(np.zeros(3), start, end) > avoid_mm + 2:
            draw_segment(volume, axes, start, end, rng.uniform(0.6, 2.2), None)
            return


def draw_segment(volume, axes, start, end, radius, mask) -> None:
    low = np.minimum(start, end) - radius - 2
    high = np.maximum(start, end) + radius + 2
    slices = []
    for i, axis in enumerate(axes):  # axes are z, y, x; points are x, y, z
        k = 2 - i
        indices = np.nonzero((axis >= low[k]) & (axis <= high[k]))[0]
        if indices.size == 0:
            return
        slices.append(slice(indices[0], indices[-1] + 1))
    box = tuple(slices)
    offset = _offsets(axes, box, np.zeros(3))
    weight = _capsule(offset, start, end, radius, 0.7)
    if mask is not None:
        weight = weight * mask[box]
    region = volume[box]
    region[...] = region + weight * (SOFT_TISSUE_HU - region)


def _offsets(axes_mm, box, center) -> list[np.ndarray]:
    """x, y, z offsets (mm) from ``center`` of the voxels in ``box``, broadcast to the box's shape."""
    z, y, x = (axes_mm[i][box[i]][(slice(None),) + (None,) * (2 - i)] for i in range(3))
    return np.broadcast_arrays(x - center[0], y - center[1], z - center[2])


def _capsule(offset, start, end, radius: float, blur: float) -> np.ndarray:
    """Soft indicator of a capsule (segment start-end thickened by radius)."""
    axis = np.asarray(end, dtype=np.float64) - np.asarray(start, dtype=np.float64)
    length_sq = float(axis @ axis) or 1e-9
    rel = [offset[k] - start[k] for k in range(3)]
    t = np.clip((rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) / length_sq, 0.0, 1.0)
    distance = np.sqrt(sum((rel[k] - t * axis[k]) ** 2 for k in range(3)))
    return soft_step(radius - distance, blur)


def point_segment_distance(point: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Distance in mm from a point to the segment start-end."""
    axis = end - start
    t = np.clip(np.dot(point - start, axis) / max(np.dot(axis, axis), 1e-9), 0, 1)
    return float(np.linalg.norm(point - (start + t * axis)))


def soft_step(signed_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """0 outside, 1 inside, a smooth edge of about ``width_mm`` (partial volume)."""
    return np.clip(0.5 + signed_mm / max(width_mm, 1e-3), 0.0, 1.0)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], amplitude_hu: float) -> np.ndarray:
    """Smooth random parenchymal texture: coarse noise upsampled to ``shape``."""
    coarse = torch.from_numpy(rng.normal(0.0, 1.0, tuple(max(2, s // 6) for s in shape)).astype(np.float32))
    fine = F.interpolate(coarse[None, None], size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]
    return (fine.numpy() * amplitude_hu).astype(np.float32)


def unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _box(axes_mm, center, reach):
    """Index slices ``[z, y, x]`` of the voxels within ``reach`` mm of ``center`` (x, y, z)."""
    slices = []
    for i, axis in enumerate(axes_mm):
        k = 2 - i
        indices = np.nonzero(np.abs(axis - center[k]) <= reach)[0]
        if indices.size == 0:
            return None
        slices.append(slice(indices[0], indices[-1] + 1))
    return tuple(slices)
