"""One PNG a person can read: each nodule's three views with their heatmaps and attention."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from m3netcore.atomic import atomic_path
from m3netcore.crops import Preprocessing, sample_scale
from m3netcore.predict import NoduleResult


def save_overview_png(
    image: sitk.Image,
    results: Sequence[NoduleResult],
    labels: Sequence[str],
    preprocessing: Preprocessing,
    path: str | os.PathLike,
) -> None:
    """Axial mid-slices of every view (CT in a lung window) with the Grad-CAM on top.

    Rows are nodules; columns are the scales. Titles give the scale's attention weight, and
    each row's label gives the probability. Radiological display: patient left on the right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = preprocessing.scales
    figure, axes = plt.subplots(
        len(results), len(scales), figsize=(3.2 * len(scales), 3.4 * len(results)), squeeze=False
    )
    for row, (label, result) in enumerate(zip(labels, results, strict=True)):
        for column, spec in enumerate(scales):
            ax = axes[row, column]
            hu = sample_scale(image, result.point_lps, spec, preprocessing.outside_hu)
            extent = (-spec.field_of_view_mm[0] / 2, spec.field_of_view_mm[0] / 2,
                      spec.field_of_view_mm[1] / 2, -spec.field_of_view_mm[1] / 2)
            ax.imshow(_slice_through_centre(hu), cmap="gray", vmin=-1200, vmax=300, extent=extent)
            heatmap = result.heatmaps.get(spec.name)
            if heatmap is not None:
                values = _slice_through_centre(sitk.GetArrayViewFromImage(heatmap))
                ax.imshow(np.ma.masked_less(values, 0.2), cmap="inferno", alpha=0.45, vmin=0, vmax=1, extent=extent)
            attention = (result.scale_attention or {}).get(spec.name)
            title = f"{spec.name} {spec.field_of_view_mm[0]:g} mm"
            if attention is not None:
                title += f"  attention {attention:.2f}"
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(f"{label}\np = {result.probability:.2f} ({result.label})", fontsize=9)
    figure.suptitle(
        f"{results[0].model.get('name', '')}: axial slices through each point, Grad-CAM overlay "
        "(research software, not for clinical use)",
        fontsize=9,
    )
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=90)
    plt.close(figure)


def _slice_through_centre(volume: np.ndarray) -> np.ndarray:
    """The axial plane through the grid's centre: the middle slice, or the mean of the two
    middle slices when the grid has an even number of them (the centre lies between)."""
    depth = volume.shape[0]
    if depth % 2:
        return np.asarray(volume[depth // 2])
    return 0.5 * (np.asarray(volume[depth // 2 - 1]) + np.asarray(volume[depth // 2]))
