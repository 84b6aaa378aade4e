"""Patient-level, stratified, deterministic folds: no patient's nodules on both sides."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def patient_folds(
    patients: Sequence[str], strata: Sequence[int], *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Fold number (0..folds-1) for each nodule, grouped by patient and stratified.

    Uses scikit-learn's ``StratifiedGroupKFold``: every patient's nodules share one fold
    and each fold gets about the same share of every stratum. Stratify on something all
    label protocols share (e.g. the rounded mean malignancy) so one assignment serves all.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if len(patients) != len(strata):
        raise ValueError(f"{len(patients)} patients for {len(strata)} strata")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if len(set(patients)) < folds:
        raise ValueError(f"{folds} patient-level folds need at least {folds} patients, got {len(set(patients))}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = np.full(len(patients), -1, dtype=int)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(patients)), np.asarray(strata), np.asarray(patients))):
        assignment[test] = fold
    return assignment
