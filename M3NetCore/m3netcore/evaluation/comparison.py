"""Paired comparisons of two scores of the same nodules, and the spread of per-fold AUCs.

Two rows of a table are compared on the same nodules: the difference of their AUCs, with
a 95% interval from resampling whole patients (a patient's nodules are not independent),
both scores computed on every resample. A claim "A beats B" may be made only where the
interval excludes zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from m3netcore.data.baselines import patient_bootstrap
from m3netcore.metrics import roc_auc


def paired_auc_difference(
    scores: np.ndarray, reference: np.ndarray, labels: np.ndarray, patients: Sequence[str], *, seed: int = 0
) -> dict:
    """``AUC(scores) - AUC(reference)`` on the same nodules, with a 95% patient-bootstrap interval.

    Returns:
        ``{"difference", "ci", "excludes_zero", "nodules"}``; ``excludes_zero`` is whether
        the whole interval lies on one side of 0.

    Raises:
        ValueError: the inputs differ in length, or the labels hold one class only.
    """
    scores = np.asarray(scores, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    patients = np.asarray([str(p) for p in patients])
    if not (scores.shape == reference.shape == labels.shape == patients.shape) or scores.ndim != 1:
        raise ValueError(
            f"scores {scores.shape}, reference {reference.shape}, labels {labels.shape} and patients "
            f"{patients.shape} must be vectors of one length"
        )
    difference, interval = patient_bootstrap(
        lambda idx: roc_auc(scores[idx], labels[idx]) - roc_auc(reference[idx], labels[idx]), patients, seed
    )
    low, high = interval
    return {"difference": difference, "ci": interval, "excludes_zero": bool(low > 0 or high < 0),
            "nodules": int(labels.size)}  # fmt: skip


def paired_by_nodule(
    scores: dict[str, float], reference: dict[str, float], labels: dict[str, int], patients: dict[str, str],
    *, seed: int = 0,
) -> dict:  # fmt: skip
    """:func:`paired_auc_difference` on the nodules both score maps hold (keyed by nodule id)."""
    shared = sorted(set(scores) & set(reference))
    if not shared:
        raise ValueError("the two rows share no nodules")
    return paired_auc_difference(
        np.array([scores[n] for n in shared]), np.array([reference[n] for n in shared]),
        np.array([labels[n] for n in shared]), [patients[n] for n in shared], seed=seed,
    )  # fmt: skip


def spread(values: Sequence[float]) -> dict:
    """Mean, standard deviation (n - 1; 0 for one value), minimum and maximum of per-fold AUCs."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if values.size == 0:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "sd": sd, "min": float(values.min()), "max": float(values.max()),
            "n": int(values.size)}  # fmt: skip
