"""What the radiologist sees: the heatmap over the CT in a slice view and in the 3D view.

Real rendering: the slice view is blended by Slicer's slice logic (no OpenGL needed); the
3D view is Slicer's displayable managers drawing with VTK into an offscreen EGL window
(Mesa llvmpipe on this machine). PNGs are saved next to the test's files, and also into
``$M3NET_SCREENSHOTS`` when that is set (how the README's screenshot is made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from M3NetSlicerLib.headless import OffscreenViews, write_png
from M3NetSlicerLib.logic import M3NetLogic
from mrml_helpers import add_points, add_volume, heat_pixels

import m3netcore


def save(rgb: np.ndarray, path: Path) -> None:
    write_png(rgb, path)
    target = os.environ.get("M3NET_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def disc(shape, centre_rc, radius) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre_rc[0]) ** 2 + (cols - centre_rc[1]) ** 2 <= radius**2


def slice_pixel(views: OffscreenViews, name: str, ras) -> tuple[float, float]:
    """Row and column (top row first) where RAS point ``ras`` falls in slice view ``name``."""
    node = views.slice_node(name)
    xy_to_ras = np.array([[node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y, _, _ = np.linalg.inv(xy_to_ras) @ np.array([*ras, 1.0])
    height = node.GetDimensions()[1]
    return height - 1 - y, x


@pytest.fixture
def shown(app, small_chest):
    image, nodules = small_chest
    views = OffscreenViews(app.scene, app.application_logic, size=256)
    volume = add_volume(app.scene, image)
    points = add_points(app.scene, nodules)
    logic = M3NetLogic(app.scene, app.volume_rendering_logic)
    return views, volume, points, logic


def test_slice_view_shows_the_heatmap_on_the_nodule(shown, tmp_path):
    views, volume, points, logic = shown
    model = m3netcore.load_model("demo")
    output = logic.run(volume, points, model, device="cpu", opacity=0.6, threshold=0.2)
    for index, nodule in enumerate(output.nodules):
        logic.show_nodule(output, index, opacity=0.6, threshold=0.2)
        views.fit_slice("Red", 120.0)
        with_heatmap = views.capture_slice("Red")
        row, col = slice_pixel(views, "Red", nodule.point_ras)
        assert abs(row - 127.5) < 2 and abs(col - 127.5) < 2  # the view jumped to the nodule
        mm_per_pixel = 120.0 / 256
        near = disc(with_heatmap.shape, (row, col), 25.0 / mm_per_pixel)  # within the meso field of view
        heat = heat_pixels(with_heatmap)
        save(with_heatmap, tmp_path / f"slice_view_{index + 1}.png")
        assert heat[near].sum() > 200, "the heatmap is not drawn around the nodule"
        assert heat[near].sum() > 0.9 * heat.sum(), "heat colours away from the nodule"

        logic.set_heatmap_style(output, opacity=0.0, threshold=0.2)
        without = views.capture_slice("Red")
        assert heat_pixels(without).sum() == 0  # the colour came from the heatmap, not the CT


def test_3d_view_shows_the_heatmap_surface_inside_the_ct(shown, rendering, tmp_path):
    views, volume, points, logic = shown
    from M3NetSlicerLib.display import show_ct_in_3d

    show_ct_in_3d(logic.volume_rendering_logic, volume)  # as the batch script does; the panel leaves the CT alone
    model = m3netcore.load_model("demo")
    output = logic.run(volume, points, model, device="cpu", threshold=0.2)
    nodule = output.nodules[0]
    logic.show_nodule(output, 0)
    with_heatmap = views.capture_3d(azimuth=0.0, elevation=0.0)
    renderer = views._renderer
    renderer.SetWorldPoint(*nodule.point_ras, 1.0)
    renderer.WorldToDisplay()
    x, y, _ = renderer.GetDisplayPoint()
    row, col = views.size - 1 - y, x
    assert 0 <= row < views.size and 0 <= col < views.size
    near = disc(with_heatmap.shape, (row, col), 10)

    for surface in logic.outputs(volume.GetID(), "heatmap-surface"):
        surface.GetDisplayNode().SetVisibility(False)
    without = views.capture_3d(azimuth=0.0, elevation=0.0)
    save(with_heatmap, tmp_path / "3d_view.png")
    save(without, tmp_path / "3d_view_ct_only.png")
    gained = heat_pixels(with_heatmap)[near].mean() - heat_pixels(without)[near].mean()
    assert gained > 0.3, f"heat colours where the nodule projects rose by only {gained:.2f}"
    changed = np.abs(with_heatmap.astype(int) - without.astype(int)).sum(axis=2) > 30
    assert changed[near].mean() > changed[~disc(with_heatmap.shape, (row, col), 60)].mean()
    # The CT is drawn too: the body shows where there is no heatmap.
    assert (without.sum(axis=2) > 60).mean() > 0.05
