"""Generated tasks where only one field of view can decide: the evidence behind scale attention.

``macro``: for the malignant class a bright blob lies 34-42 mm from the nodule, beyond the
meso view's 24 mm half-width and inside the macro view's 48 mm; nothing else differs.
``micro``: for the malignant class the nodule carries 1.5 mm stripes, detail that only the
0.75 mm micro view resolves. A model whose scale attention means "this view decided"
must put its weight on macro in the first task and on micro in the second, while a
micro-only model cannot solve the first. Generated data, no patient images.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from m3netcore.crops import Preprocessing, extract_crops

TASKS = ("macro", "micro")


def mechanism_patch(rng: np.random.Generator, malignant: bool, task: str) -> sitk.Image:
    """A 100 mm cube of lung (1 mm voxels, LPS, centred on 0), a nodule at the centre."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    axis = np.arange(100) - 49.5
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    volume = -850.0 + rng.normal(0.0, 30.0, (100, 100, 100))
    nodule = np.sqrt(xx**2 + yy**2 + zz**2) <= rng.uniform(4.0, 8.0)
    volume = np.where(nodule, 30.0, volume)
    if malignant and task == "macro":
        direction = rng.normal(size=3)
        centre = direction / np.linalg.norm(direction) * rng.uniform(34.0, 42.0)
        blob = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2 <= 36.0
        volume = np.where(blob, 60.0, volume)
    if malignant and task == "micro":
        stripes = 200.0 * np.sign(np.sin(2 * np.pi * xx / 1.5 + rng.uniform(0, 2 * np.pi)))
        volume = np.where(nodule, 30.0 + stripes, volume)
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetOrigin((float(axis[0]),) * 3)
    return image


def mechanism_dataset(
    count: int, seed: int, task: str, preprocessing: Preprocessing
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``count`` nodules, half malignant: views ``(N, 1, D, H, W)`` per scale, and the labels.

    The click is jittered by up to 1 mm per axis, as a user's would be.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    views: dict[str, list[np.ndarray]] = {name: [] for name in preprocessing.scale_names}
    for label in labels:
        click = rng.uniform(-1.0, 1.0, 3)
        for name, crop in extract_crops(mechanism_patch(rng, bool(label), task), click, preprocessing).items():
            views[name].append(crop)
    tensors = [torch.from_numpy(np.stack(views[name]))[:, None] for name in preprocessing.scale_names]
    return tensors, torch.from_numpy(labels)
