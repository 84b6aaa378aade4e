"""Run settings, the learning-rate schedule and the validation threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m3netcore.errors import M3NetInputError
from m3netcore.metrics import best_threshold
from m3netcore.train.config import RunConfig, read_config
from m3netcore.train.trainer import warmup_cosine


def test_config_files_json_and_toml_give_the_same_settings(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"epochs": 3, "mi_weight": 0.0, "model_config": {"dropout": 0.1}}))
    (tmp_path / "a.toml").write_text('epochs = 3\nmi_weight = 0.0\n[model_config]\ndropout = 0.1\n')
    from_json, from_toml = read_config(tmp_path / "a.json"), read_config(tmp_path / "a.toml")
    assert from_json == from_toml == RunConfig(epochs=3, mi_weight=0.0, model_config={"dropout": 0.1})
    assert from_json.replace(epochs=None, seed=4).epochs == 3  # None leaves a setting alone
    assert RunConfig.from_dict({"learning_rate": 1}).learning_rate == 1.0  # a whole number is a fine rate


@pytest.mark.parametrize(
    ("values", "message"),
    [({"epochs": 0}, "epochs must be positive"), ({"protocol": "x"}, "unknown label protocol"),
     ({"max_scale_change": 1.5}, "max_scale_change"), ({"batch": 3}, "unknown training setting"),
     ({"epochs": 1.5}, "epochs must be a whole number, got 1.5"), ({"flip": "no"}, "flip must be true or false"),
     ({"seed": True}, "seed must be a whole number"), ({"learning_rate": "fast"}, "learning_rate must be a number"),
     ({"model_config": [1]}, "model_config must be a mapping")],
)  # fmt: skip
def test_bad_settings_name_the_value(values, message):
    with pytest.raises(M3NetInputError, match=message):
        RunConfig.from_dict(values)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factor = warmup_cosine(0.1, 100)
    values = [factor(step) for step in range(100)]
    assert values[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def test_threshold_maximises_balanced_accuracy():
    probabilities = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert best_threshold(probabilities, labels) == pytest.approx(0.35)
