"""The reference rows that head every results table: majority class and simple regressions.

All rows use the stored patient-level folds: each fold's nodules are predicted by a model
fitted on the other folds, and AUC and accuracy are computed on the pooled out-of-fold
predictions, with 95% intervals from resampling patients (bootstrap).

The regressions call a nodule malignant at the threshold of best balanced accuracy on the
folds they were fitted on: the rule the networks follow on their validation split
(:func:`m3netcore.metrics.best_threshold`), so that accuracy, sensitivity and
specificity compare like with like. The majority class calls every nodule the majority.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from m3netcore.data.labels import check_protocol
from m3netcore.data.manifest import OTHER_RATINGS
from m3netcore.errors import M3NetInputError
from m3netcore.metrics import best_threshold, roc_auc

BOOTSTRAP_SAMPLES = 1000

REFERENCE_MODELS = {
    "majority class": (),
    "diameter only (logistic regression)": ("diameter_mm",),
    "diameter + readers' other ratings (logistic regression)": ("diameter_mm", *(f"mean_{n}" for n in OTHER_RATINGS)),
}


def reference_rows(
    rows: Sequence[dict], protocol: str, *, seed: int = 0, models: Sequence[str] | None = None
) -> list[dict]:
    """AUC and accuracy (with patient-bootstrap 95% CIs) of each reference model under ``protocol``.

    Each row also gives its fitted numbers (``parameters``: coefficients and intercept; the
    majority class keeps one), ``gflops`` per nodule and ``training_seconds`` (all folds).

    ``models``: names from :data:`REFERENCE_MODELS` (default all).

    Raises:
        M3NetInputError: the rows lack the protocol's labels, the folds or a feature, or
            hold one class only.
    """
    check_protocol(protocol)
    column = f"label_{protocol}"
    for needed in (column, "fold", "patient_id"):
        if not rows or needed not in rows[0]:
            raise M3NetInputError(f"the nodule table has no {needed} column: no reference rows under {protocol}")
    kept = [r for r in rows if r[column] is not None]
    unfolded = sum(1 for r in kept if r["fold"] is None)
    if unfolded:
        raise M3NetInputError(f"{unfolded} labelled nodules have no fold: the reference rows need every one in a fold")
    labels = np.asarray([r[f"label_{protocol}"] for r in kept], dtype=int)
    if labels.size == 0 or labels.min() == labels.max():
        raise M3NetInputError(f"protocol {protocol} leaves {labels.size} nodules of one class: nothing to separate")
    folds = np.asarray([r["fold"] for r in kept], dtype=int)
    patients = np.asarray([r["patient_id"] for r in kept])
    import sklearn.linear_model  # noqa: F401  (imported here, so that the fits' times leave out the import)

    table = []
    for name, features in REFERENCE_MODELS.items():
        if models is not None and name not in models:
            continue
        started = time.perf_counter()
        scores, thresholds = _out_of_fold_scores(kept, features, labels, folds)
        seconds = time.perf_counter() - started
        predictions = (scores >= thresholds).astype(int)
        auc, auc_ci = _with_interval(lambda idx, s=scores: roc_auc(s[idx], labels[idx]), patients, seed)
        accuracy, accuracy_ci = _with_interval(
            lambda idx, p=predictions: float(np.mean(p[idx] == labels[idx])), patients, seed
        )
        table.append(
            {
                "name": name,
                "protocol": protocol,
                "nodules": len(kept),
                "malignant": int(labels.sum()),
                "auc": auc,
                "auc_ci": auc_ci,
                "accuracy": accuracy,
                "accuracy_ci": accuracy_ci,
                "sensitivity": float(np.mean(predictions[labels == 1] == 1)),
                "specificity": float(np.mean(predictions[labels == 0] == 0)),
                "parameters": len(features) + 1,
                "gflops": 2 * len(features) / 1e9,  # a scaled dot product
                "training_seconds": round(seconds, 3),
                "fold_aucs": [_fold_auc(scores, labels, folds == fold) for fold in np.unique(folds)],
            }
        )
    return table


def reference_scores(rows: Sequence[dict], protocol: str, name: str) -> dict[str, float]:
    """Each labelled nodule's out-of-fold score from reference model ``name``, keyed by nodule id.

    The scores :func:`reference_rows` ranks, for paired comparisons on the same nodules.

    Raises:
        M3NetInputError: an unknown name, or the rows lack what the model needs.
    """
    check_protocol(protocol)
    if name not in REFERENCE_MODELS:
        raise M3NetInputError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE_MODELS)}")
    column = f"label_{protocol}"
    kept = [r for r in rows if r.get(column) is not None]
    if not kept or any(r.get("fold") is None for r in kept):
        raise M3NetInputError(f"reference scores need every {protocol}-labelled nodule in a fold")
    labels = np.asarray([r[column] for r in kept], dtype=int)
    folds = np.asarray([r["fold"] for r in kept], dtype=int)
    scores, _ = _out_of_fold_scores(kept, REFERENCE_MODELS[name], labels, folds)
    return {str(r["nodule_id"]): float(s) for r, s in zip(kept, scores, strict=True)}


def patient_bootstrap(metric, patients: np.ndarray, seed: int = 0) -> tuple[float, list[float]]:
    """The metric on all nodules, and a 95% percentile interval resampling whole patients.

    ``metric`` takes an index array of nodules (with repeats) and returns a float; a
    resample on which it raises ``ValueError`` (an AUC of one class) is skipped.
    """
    return _with_interval(metric, np.asarray(patients), seed)


def _fold_auc(scores: np.ndarray, labels: np.ndarray, members: np.ndarray) -> float | None:
    """The AUC of one fold's nodules, or None where the fold holds one class (or is constant: majority)."""
    if labels[members].min() == labels[members].max():
        return None
    return roc_auc(scores[members], labels[members])


def _out_of_fold_scores(rows, features: Sequence[str], labels: np.ndarray,
                        folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each nodule's score from the model of the other folds, and the threshold that model calls at."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores, thresholds = np.zeros(len(rows)), np.full(len(rows), 0.5)
    missing = [f for f in features if any(r.get(f) is None for r in rows)]
    if missing:
        raise M3NetInputError(f"some nodules have no {', '.join(missing)}: cannot fit the reference regression")
    x = np.asarray([[r[f] for f in features] for r in rows], dtype=np.float64) if features else None
    for fold in np.unique(folds):
        test, train = folds == fold, folds != fold
        if not features:  # the training folds' majority, the same constant for every nodule
            scores[test] = float(labels[train].mean() >= 0.5)
            continue
        if labels[train].min() == labels[train].max():
            raise M3NetInputError(f"fold {fold}'s training nodules are all of one class")
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x[train], labels[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
        thresholds[test] = best_threshold(model.predict_proba(x[train])[:, 1], labels[train])
    return scores, thresholds


def _with_interval(metric, patients: np.ndarray, seed: int) -> tuple[float, list[float]]:
    """The metric on all nodules, and a 95% percentile interval resampling whole patients."""
    everything = np.arange(patients.size)
    value = metric(everything)
    unique, inverse = np.unique(patients, return_inverse=True)
    members = [np.nonzero(inverse == k)[0] for k in range(unique.size)]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(BOOTSTRAP_SAMPLES):
        chosen = rng.integers(0, unique.size, unique.size)
        index = np.concatenate([members[k] for k in chosen])
        try:
            samples.append(metric(index))
        except ValueError:  # a resample with one class only has no AUC
            continue
    if not samples:
        return float(value), [float("nan"), float("nan")]
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(value), [float(low), float(high)]
