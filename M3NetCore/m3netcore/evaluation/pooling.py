"""Make the fold models of a cross-validation comparable before their predictions are pooled.

Each fold has its own model, and each model its own logit scale and offset. Pooled as
they come, a nodule's rank among the others depends on which fold's model scored it, and
the pooled AUC falls below the folds' own AUCs (0.017 on LIDC-phantom, issue 14). So every
fold model gets an intercept and a temperature (Platt scaling; Platt, "Probabilistic
outputs for support vector machines", 1999) fitted on its own validation split, which is
part of its training folds and never its test fold, and only then are the folds pooled.
The seeds of one fold are combined by averaging these recalibrated logits.

Example:
    >>> fit = fit_recalibration(validation_logits, validation_labels)
    >>> probability = sigmoid(fit(test_logits))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POOLING = (
    "per-fold recalibration: an intercept and a temperature (Platt scaling) fitted on each fold model's own "
    "validation split, then the folds pooled"
)
ENSEMBLE = "the seeds of a fold: their recalibrated logits averaged (a logit-averaged ensemble)"
MIN_SLOPE, MAX_SLOPE = 0.05, 20.0  # 1 / temperature, the bounds fit_temperature keeps


@dataclass(frozen=True)
class Recalibration:
    """``slope * logit + intercept``: the recalibrated logit (``slope`` is 1 / temperature)."""

    slope: float
    intercept: float

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(logits, dtype=np.float64) + self.intercept

    def to_dict(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "temperature": 1.0 / self.slope}


def fit_recalibration(logits: np.ndarray, labels: np.ndarray, *, l2: float = 1e-4) -> Recalibration:
    """The slope and intercept that minimise the log-loss of ``sigmoid(slope * logit + intercept)``.

    Newton's method on the two parameters, with a small ridge ``l2`` so that separable
    validation logits give a finite answer; the slope is kept in [0.05, 20] (never negative:
    recalibration must not reverse a fold's ranking).

    Raises:
        ValueError: the labels do not hold both classes, or the sizes differ.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.shape != y.shape or z.ndim != 1:
        raise ValueError(f"logits {z.shape} and labels {y.shape} must be two vectors of one length")
    if not (0 < y.sum() < y.size):
        raise ValueError("recalibration needs both classes among the validation labels")
    design = np.stack([z, np.ones_like(z)], axis=1)
    weights = np.array([1.0, 0.0])

    def loss(w: np.ndarray) -> float:
        eta = design @ w
        return float(np.mean(np.logaddexp(0.0, eta) - y * eta) + 0.5 * l2 * w @ w)

    current = loss(weights)
    for _ in range(100):
        p = sigmoid(design @ weights)
        gradient = design.T @ (p - y) / y.size + l2 * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design / y.size + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and loss(weights - scale * step) > current:
            scale /= 2
        weights = weights - scale * step
        previous, current = current, loss(weights)
        if previous - current < 1e-12:
            break
    slope = float(np.clip(weights[0], MIN_SLOPE, MAX_SLOPE))
    intercept = float(weights[1])
    if slope != weights[0]:  # the slope hit a bound: the intercept that goes with it
        intercept = _intercept_for(z * slope, y)
    return Recalibration(slope, intercept)


def average_logits(logits_per_seed: list[np.ndarray]) -> np.ndarray:
    """The seed ensemble's logit of each nodule: the mean of the seeds' recalibrated logits."""
    return np.mean(np.stack([np.asarray(z, dtype=np.float64) for z in logits_per_seed]), axis=0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    # beyond +/-500 the probability is 0 or 1 in float64 anyway; the clip only spares the overflow warning
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -500.0, 500.0)))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def _intercept_for(scaled: np.ndarray, y: np.ndarray) -> float:
    """The intercept minimising the log-loss of ``sigmoid(scaled + b)`` (one-dimensional Newton)."""
    b = 0.0
    for _ in range(100):
        p = sigmoid(scaled + b)
        step = np.sum(p - y) / max(np.sum(p * (1 - p)), 1e-12)
        b -= step
        if abs(step) < 1e-10:
            break
    return float(b)
