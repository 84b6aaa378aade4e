"""The figures keep every text on the canvas: confusion.png, curves.png and the phantom's preview.png."""

from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")  # the [report] extra
from matplotlib.image import imread  # noqa: E402

from m3netcore.data.phantom_cache import preview_figure  # noqa: E402
from m3netcore.train.plots import confusion_figure, curves_figure, plot_confusion, plot_curves  # noqa: E402

# the run: AUC tied at 1.000 while the validation loss fell
HISTORY = [{"epoch": e, "train_loss": 1 / e, "bce_loss": 0.6 / e, "mi_loss": 1.5 - 0.05 * e, "vote_loss": 0.5 / e,
            "val_loss": loss, "val_auc": 1.0, "lr": 1e-3 / e}
           for e, loss in enumerate((0.639, 0.41, 0.22, 0.11, 0.055), start=1)]  # fmt: skip


def _outside(figure, tolerance_px: float = 3.0) -> list[str]:
    """What is drawn past the canvas: each panel's tight box (ticks, labels, title), figure texts, legends."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [(f"panel {ax.get_title()!r}", ax.get_tightbbox(renderer)) for ax in figure.axes]
    boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in figure.texts if t.get_text().strip()]
    boxes += [("legend", legend.get_window_extent(renderer)) for legend in figure.legends]
    canvas = figure.bbox.padded(tolerance_px)
    return [name for name, box in boxes if not (canvas.contains(*box.p0) and canvas.contains(*box.p1))]


def _border_is_blank(path) -> bool:
    """No ink on the PNG's outermost pixels: nothing cut at the edge (the old confusion.png's "ruly malignant")."""
    pixels = imread(path)[..., :3]
    return all(edge.min() > 0.99 for edge in (pixels[:, 0], pixels[:, -1], pixels[0], pixels[-1]))


def test_confusion_keeps_its_axis_labels_on_the_canvas(tmp_path):
    figure = confusion_figure(np.array([[40, 5], [7, 30]]), 0.4321)
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["truly benign", "truly malignant"]
    assert _outside(figure) == []
    plot_confusion(np.array([[40, 5], [7, 30]]), 0.4321, tmp_path / "confusion.png")
    height, width, _ = imread(tmp_path / "confusion.png").shape
    assert _border_is_blank(tmp_path / "confusion.png")
    assert 300 <= width <= 600 and 300 <= height <= 500


def test_curves_mark_the_selected_epoch_and_the_legend_hides_no_curve(tmp_path):
    figure = curves_figure(HISTORY)
    assert _outside(figure) == []
    (legend,) = figure.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert "selected epoch 5" in labels and "train BCE" in labels and "train per-scale votes" in labels
    renderer = figure.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in figure.axes)  # below the panels
    risen = [dict(row) for row in HISTORY]
    risen[3]["val_loss"] = 0.3  # epoch 3 (0.22) is now the lowest loss after epoch 5's 0.055 ...
    risen[4]["val_loss"] = 0.5  # ... rises: the selection moves back
    assert "selected epoch 3" in [t.get_text() for t in curves_figure(risen).legends[0].get_texts()]
    plot_curves(HISTORY, tmp_path / "curves.png")
    height, width, _ = imread(tmp_path / "curves.png").shape
    assert _border_is_blank(tmp_path / "curves.png")
    assert width >= 1200 and height >= 380


def test_phantom_preview_titles_are_readable_and_on_the_canvas(tmp_path):
    rng = np.random.default_rng(0)
    slices = [rng.uniform(-1000, 400, (32, 32)) for _ in range(12)]
    titles = [f"LIDC-IDRI-{k:04d}-s1-n2\nmalignancy 3/4/5/3\ntexture 5/5/5/4 margin 4/2/4/3\ncalc. 6/6/6/6 d 24 mm"
              for k in range(12)]  # fmt: skip
    figure = preview_figure(slices, titles)
    assert _outside(figure) == []
    renderer = figure.canvas.get_renderer()
    line_heights_px = [ax.title.get_window_extent(renderer).height / 4 for ax in figure.axes if ax.title.get_text()]
    assert len(line_heights_px) == 12 and min(line_heights_px) >= 11  # was about 6 px
    figure.savefig(tmp_path / "preview.png", dpi=100, bbox_inches="tight")
    height, width, _ = imread(tmp_path / "preview.png").shape
    assert _border_is_blank(tmp_path / "preview.png")
    assert 1000 <= width <= 1600 and 900 <= height <= 1400
