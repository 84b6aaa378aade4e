"""The first training loop: augmentation, learning, calibration, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3netcore.metrics import accuracy, expected_calibration_error, roc_auc
from m3netcore.models import build_model
from m3netcore.train.loop import TrainConfig, augment, evaluate_logits, fit_temperature, predict_logits, train


def test_augment_applies_one_transform_to_all_views_of_a_nodule():
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(16, 1, 8, 8, 8, generator=generator)
    views = [base, base * 2.0, base + 1.0]
    out = augment(views, torch.Generator().manual_seed(3))
    assert torch.allclose(out[1], out[0] * 2.0)
    assert torch.allclose(out[2], out[0] + 1.0)
    assert not torch.allclose(out[0], base)  # something was flipped
    # each output is an exact symmetry of its input: same multiset of values per nodule
    assert torch.allclose(out[0].flatten(1).sort(dim=1).values, base.flatten(1).sort(dim=1).values)


def test_training_learns_a_scale_dependent_rule():
    """Label = is the macro view bright; a few epochs of m3net must get it right."""
    generator = torch.Generator().manual_seed(0)
    count = 96
    labels = (torch.arange(count) % 2).long()
    micro = torch.rand(count, 1, 32, 32, 32, generator=generator) * 0.2
    meso = torch.rand(count, 1, 32, 32, 32, generator=generator) * 0.2
    macro = torch.rand(count, 1, 32, 32, 32, generator=generator) * 0.2 + 0.5 * labels.view(-1, 1, 1, 1, 1)
    views = [micro, meso, macro]
    network = build_model("m3net")
    history = train(network, views, labels, TrainConfig(epochs=4, batch_size=16, seed=0), log=lambda _: None)
    assert history[-1]["bce"] < history[0]["bce"]
    metrics = evaluate_logits(predict_logits(network, views), labels.numpy())
    assert metrics["auc"] > 0.95


def test_training_is_deterministic_for_a_seed():
    generator = torch.Generator().manual_seed(1)
    views = [torch.rand(32, 1, 32, 32, 32, generator=generator) for _ in range(3)]
    labels = (torch.arange(32) % 2).long()
    weights = []
    for _ in range(2):
        torch.manual_seed(5)
        network = build_model("m3net")
        train(network, views, labels, TrainConfig(epochs=1, batch_size=16, seed=7), log=lambda _: None)
        weights.append(torch.cat([p.detach().flatten() for p in network.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-true_logits))
    overconfident = true_logits * 3.0  # a network three times too sure of itself
    assert fit_temperature(overconfident, labels) == pytest.approx(3.0, rel=0.08)


def test_metrics_on_known_values():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))
    assert accuracy(np.array([0.2, 0.7, 0.6]), np.array([0, 1, 0])) == pytest.approx(2 / 3)
    assert expected_calibration_error(np.array([0.9, 0.9, 0.1, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.1)


def test_temperature_fit_never_returns_nan_on_separable_logits():
    from m3netcore.train.loop import fit_temperature

    labels = np.arange(24) % 2
    for logits in (np.where(labels == 1, 1e-3, -1e-3), np.where(labels == 1, 50.0, -50.0), np.zeros(24)):
        temperature = fit_temperature(logits, labels)
        assert np.isfinite(temperature) and 0.05 <= temperature <= 20.0
