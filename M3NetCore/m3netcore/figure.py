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


PLANES = ("axial", "coronal", "sagittal")


def save_nodule_png(
    image: sitk.Image,
    result: NoduleResult,
    label: str,
    preprocessing: Preprocessing,
    path: str | os.PathLike,
) -> None:
    """One nodule's picture: axial, coronal and sagittal planes through the point for every view.

    Columns are the scales (micro, meso, macro), rows the planes; the CT in a lung window with
    each scale's Grad-CAM times its attention weight on top, all on one colour scale (so a
    scale the model hardly used looks dim), the point marked with a cross, a colour bar, and
    the probability, call and attention in the title. Radiological display (patient left on
    the right; superior up in coronal and sagittal planes; anterior left in sagittal).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = preprocessing.scales
    attention = result.scale_attention or {spec.name: 1.0 / len(scales) for spec in scales}
    weighted = {}
    for spec in scales:
        heatmap = result.heatmaps.get(spec.name)
        if heatmap is not None:
            weighted[spec.name] = float(attention.get(spec.name, 0.0)) * sitk.GetArrayFromImage(heatmap)
    peak = max((float(v.max()) for v in weighted.values()), default=0.0) or 1.0
    figure, axes = plt.subplots(len(PLANES), len(scales), figsize=(2.3 * len(scales) + 1.2, 2.3 * len(PLANES) + 0.8),
                                squeeze=False, layout="constrained")  # fmt: skip
    overlay = None
    for column, spec in enumerate(scales):
        hu = sample_scale(image, result.point_lps, spec, preprocessing.outside_hu)
        half = np.asarray(spec.field_of_view_mm, dtype=float) / 2
        for row, plane in enumerate(PLANES):
            ax = axes[row, column]
            picture, extent = _plane(hu, plane, half)
            ax.imshow(picture, cmap="gray", vmin=-1200, vmax=300, extent=extent)
            if spec.name in weighted:
                values, _ = _plane(weighted[spec.name], plane, half)
                overlay = ax.imshow(np.ma.masked_less(values, 0.05 * peak), cmap="inferno", alpha=0.5,
                                    vmin=0.0, vmax=peak, extent=extent)  # fmt: skip
            ax.plot([0], [0], marker="+", color="cyan", markersize=10, markeredgewidth=1.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                weight = attention.get(spec.name)
                ax.set_title(f"{spec.name} {spec.field_of_view_mm[0]:g} mm"
                             + (f"\nattention {weight:.2f}" if weight is not None else ""), fontsize=9)  # fmt: skip
            if column == 0:
                ax.set_ylabel(plane, fontsize=9)
    if overlay is not None:
        bar = figure.colorbar(overlay, ax=axes, shrink=0.6)
        bar.set_label("Grad-CAM x attention", fontsize=8)
    figure.suptitle(f"{label}: p(malignant) = {result.probability:.2f} ({result.label}) - "
                    f"{result.model.get('name', '')}\nresearch software, not for clinical use", fontsize=9)  # fmt: skip
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=80)
    plt.close(figure)


def _plane(volume: np.ndarray, plane: str, half_mm: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """The plane through the centre of a ``[z, y, x]`` LPS-aligned volume, oriented for display; its extent in mm."""
    hx, hy, hz = half_mm
    if plane == "axial":  # rows anterior->posterior, columns right->left
        return _middle(volume, 0), (-hx, hx, hy, -hy)
    if plane == "coronal":  # rows superior->inferior (z decreasing), columns right->left
        return _middle(volume, 1)[::-1], (-hx, hx, -hz, hz)
    # sagittal: rows superior->inferior, columns anterior->posterior
    return _middle(volume, 2)[::-1], (-hy, hy, -hz, hz)


def _middle(volume: np.ndarray, axis: int) -> np.ndarray:
    """The plane through the grid's centre along ``axis`` (the mean of the two middle ones if even)."""
    depth = volume.shape[axis]
    if depth % 2:
        return np.take(volume, depth // 2, axis=axis)
    return 0.5 * (np.take(volume, depth // 2 - 1, axis=axis) + np.take(volume, depth // 2, axis=axis))
