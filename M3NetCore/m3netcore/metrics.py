"""Small, dependency-free metrics: AUC, accuracy, threshold, calibration error (training, evaluation, baselines)."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half).

    Raises:
        ValueError: if ``labels`` does not hold both classes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both classes among the labels")
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = (ends - counts + ends + 1) / 2.0  # 1-based mean rank of each tie group
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = average_rank[inverse]
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def accuracy(probabilities: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    return float(np.mean((np.asarray(probabilities) >= threshold) == np.asarray(labels).astype(bool)))


def best_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The probability threshold of highest balanced accuracy (Youden's J) on these nodules."""
    labels = np.asarray(labels).astype(bool)
    candidates = np.unique(probabilities)
    best, best_score = 0.5, -1.0
    for threshold in candidates:
        called = probabilities >= threshold
        score = called[labels].mean() + (~called[~labels]).mean()
        if score > best_score:
            best, best_score = float(threshold), score
    return best


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |observed frequency - mean probability| over equal-width bins, weighted by count."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(labels[members].mean() - probabilities[members].mean())
    return float(error)
