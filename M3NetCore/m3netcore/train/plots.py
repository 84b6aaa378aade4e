"""Figures of training and evaluation (matplotlib, the ``[report]`` extra), each written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (and work without a display)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from m3netcore.atomic import atomic_path  # noqa: E402


def plot_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Training losses, validation loss and AUC, and the learning rate per epoch; the selected epoch marked."""
    _save(curves_figure(history), path)


def curves_figure(history: Sequence[dict]):
    """The figure of :func:`plot_curves`: the legend below the panels, so it hides no curve."""
    epochs = [row["epoch"] for row in history]
    figure, (losses, auc, rate) = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
    series = (("train_loss", "train (total)", "-", "o"), ("bce_loss", "train BCE", "-", "s"),
              ("mi_loss", "train InfoNCE", "-", "^"), ("vote_loss", "train per-scale votes", ":", "x"),
              ("val_loss", "validation BCE", "--", "D"))  # fmt: skip
    for key, label, style, marker in series:
        if all(row.get(key) is not None for row in history):  # runs begun before the vote column lack it
            losses.plot(epochs, [row[key] for row in history], linestyle=style, marker=marker, markersize=4,
                        label=label)  # fmt: skip
    losses.set(xlabel="epoch", ylabel="loss", title="losses")
    auc.plot(epochs, [row["val_auc"] for row in history], marker=".", color="tab:green", label="validation AUC")
    auc.set(xlabel="epoch", ylabel="AUC", title="validation AUC", ylim=(0.4, 1.02))
    rate.plot(epochs, [row["lr"] for row in history], marker=".", color="tab:gray")
    rate.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    selected = _selected_epoch(history)
    for ax in (losses, auc, rate):
        ax.grid(alpha=0.3)
        if selected is not None:
            ax.axvline(selected, color="black", linestyle="-.", linewidth=1.0,
                       label=f"selected epoch {selected}" if ax is losses else None)  # fmt: skip
    handles, labels = losses.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=9)
    return figure


def plot_roc(probabilities: np.ndarray, labels: np.ndarray, auc: float, path: str | os.PathLike, *,
             operating_point: tuple[float, float] | None = None) -> None:  # fmt: skip
    """ROC curve with the AUC in the legend and, if given, the operating point ``(1 - specificity, sensitivity)``."""
    fpr, tpr = roc_points(probabilities, labels)
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    if operating_point is not None:
        x, y = operating_point
        ax.plot([x], [y], marker="o", color="tab:red", linestyle="none",
                label=f"operating point: sensitivity {y:.2f}, specificity {1 - x:.2f}")  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)


def plot_reliability(probabilities: np.ndarray, labels: np.ndarray, ece: float, path: str | os.PathLike,
                     bins: int = 10) -> None:  # fmt: skip
    """Observed malignant fraction against mean predicted probability per bin, over a histogram of the predictions."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    which = np.clip(np.digitize(probabilities, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    mean_p, observed, counts = [], [], []
    for b in range(bins):
        members = which == b
        if members.any():
            mean_p.append(probabilities[members].mean())
            observed.append(labels[members].mean())
            counts.append(int(members.sum()))
    figure, (ax, histogram) = plt.subplots(2, 1, figsize=(4.5, 6.0), sharex=True,
                                           gridspec_kw={"height_ratios": (3, 1.2)})  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8, label="perfect calibration")
    ax.plot(mean_p, observed, marker="o", label=f"model (ECE {ece:.3f})")
    for x, y, n in zip(mean_p, observed, counts, strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(ylabel="observed malignant fraction", title="reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    edges = np.linspace(0, 1, bins + 1)
    malignant = labels > 0.5
    histogram.hist([probabilities[~malignant], probabilities[malignant]], bins=edges, stacked=True,
                   color=["tab:blue", "tab:red"], label=["benign", "malignant"])  # fmt: skip
    histogram.set(xlabel="predicted probability of malignancy", ylabel="nodules")
    histogram.legend(fontsize=8)
    histogram.grid(alpha=0.3)
    _save(figure, path)


def plot_confusion(matrix: np.ndarray, threshold: float | str, path: str | os.PathLike) -> None:
    """2x2 confusion matrix (rows: truth benign/malignant; columns: called benign/malignant).

    ``threshold``: the calling threshold, or words for thresholds that differ (each fold's own).
    """
    _save(confusion_figure(matrix, threshold), path)


def confusion_figure(matrix: np.ndarray, threshold: float | str):
    """The figure of :func:`plot_confusion` (constrained layout: the tick labels stay on the canvas)."""
    figure, ax = plt.subplots(figsize=(4.4, 3.6), layout="constrained")
    ax.imshow(matrix, cmap="Blues")
    names = ("benign", "malignant")
    ax.set_xticks([0, 1], [f"called {n}" for n in names])
    ax.set_yticks([0, 1], [f"truly {n}" for n in names])
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(int(value)), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")  # fmt: skip
    ax.set_title(f"confusion at threshold {threshold:.3f}" if isinstance(threshold, float) else
                 f"confusion at {threshold}")  # fmt: skip
    return figure


def roc_points(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-probabilities, kind="mergesort")
    sorted_p, sorted_y = probabilities[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(sorted_p))[0], sorted_p.size - 1]
    tp = np.cumsum(sorted_y)[last_of_tie]
    fp = np.cumsum(~sorted_y)[last_of_tie]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def _selected_epoch(history: Sequence[dict]) -> int | None:
    """The epoch the run keeps (the trainer's rule), or None for a history without validation numbers."""
    from m3netcore.train.selection import is_better_epoch

    best: dict = {"epoch": None, "val_auc": -np.inf}
    for row in history:
        if row.get("val_auc") is not None and row.get("val_loss") is not None and is_better_epoch(row, best):
            best = {"epoch": row["epoch"], "val_auc": row["val_auc"], "val_loss": row["val_loss"]}
    return best["epoch"]


def _save(figure, path: str | os.PathLike) -> None:
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    with atomic_path(path) as temporary:
        # "tight": whatever a label needs is on the canvas, never cut at its edge
        figure.savefig(temporary, dpi=100, bbox_inches="tight", pad_inches=0.08)
    plt.close(figure)
