"""Fixtures for the training tests: a tiny generated cache (seconds to build, no LIDC needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m3netcore.data.cache import CacheWriter

TINY_COUNT = 60


def write_tiny_cache(path: Path, count: int = TINY_COUNT, *, seed: int = 0, folds: int = 5,
                     preprocessing=None) -> Path:  # fmt: skip
    """``count`` generated nodules in lung, two per patient, ``folds`` patient-level folds.

    Malignant nodules (odd indices) are larger (about 7 mm radius against 3 mm) and sit
    beside soft tissue in the macro view, so a few epochs can learn them. HU noise keeps
    every cube different.
    """
    rng = np.random.default_rng(seed)
    description = "generated test nodules"
    with CacheWriter(path, count, kind="tiny-test", semi_synthetic=True, description=description,
                     preprocessing=preprocessing) as writer:  # fmt: skip
        distances = {}
        for spec in writer.specs:
            axes = [(np.arange(n) - (n - 1) / 2) * s
                    for n, s in zip(spec.grid[::-1], spec.spacing_mm[::-1], strict=True)]  # fmt: skip
            z, y, x = np.meshgrid(*axes, indexing="ij")
            distances[spec.name] = (np.sqrt(x * x + y * y + z * z), x)
        for index in range(count):
            label = index % 2
            radius = (7.0 if label else 3.0) + rng.uniform(-1.0, 1.0)
            cubes = {}
            for spec in writer.specs:
                distance, x = distances[spec.name]
                hu = -850.0 + 890.0 * 0.5 * (1.0 + np.tanh((radius - distance) / 0.8))
                if label:  # soft tissue 40 mm to the left (+x in LPS): only the macro view shows it
                    hu = np.maximum(hu, np.where(x > 40.0, 40.0, -1000.0))
                cubes[spec.name] = hu + rng.normal(0.0, 20.0, hu.shape)
            patient = index // 2
            row = {
                "nodule_id": f"T-{index:03d}",
                "patient_id": f"TP-{patient:03d}",
                "diameter_mm": round(2 * radius, 2),
                "label_mean-excl3": label,
                "label_official": label,
                "fold": patient % folds,
            }
            writer.add_cubes(index, cubes, (0.0, 0.0, 0.0), row)
        return writer.commit()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cache(tmp_path_factory.mktemp("tiny") / "cache")


@pytest.fixture(scope="session")
def two_fold_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 nodules in two folds: a cross-validation of two quick runs."""
    return write_tiny_cache(tmp_path_factory.mktemp("two-fold") / "cache", 40, seed=1, folds=2)
