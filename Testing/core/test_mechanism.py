"""The fusion and the scale-attention explanation mean what the Slicer panel says they mean.

On generated tasks where only one field of view can decide (:mod:`m3netcore.data.mechanism`):
M3Net must separate the classes where the micro view alone cannot, and its mean attention
must name the deciding view. Run on their own with ``pytest -m mechanism``; they are part
of ``make test`` (about a minute each on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

from m3netcore.crops import default_preprocessing
from m3netcore.data.mechanism import mechanism_dataset
from m3netcore.metrics import roc_auc
from m3netcore.models import build_model
from m3netcore.train.loop import TrainConfig, predict_logits, train

pytestmark = pytest.mark.mechanism
PREPROCESSING = default_preprocessing()
SCALES = PREPROCESSING.scale_names


@pytest.fixture(scope="module")
def tasks():
    return {
        task: (mechanism_dataset(320, 1, task, PREPROCESSING), mechanism_dataset(128, 2, task, PREPROCESSING))
        for task in ("macro", "micro")
    }


def trained(name: str, data, seed: int = 0):
    (train_views, train_labels), (validation_views, validation_labels) = data
    torch.manual_seed(seed)
    network = build_model(name)
    chosen = [SCALES.index(s) for s in network.scale_names]
    train(network, [train_views[i] for i in chosen], train_labels, TrainConfig(seed=seed), log=lambda _: None)
    validation = [validation_views[i] for i in chosen]
    auc = roc_auc(predict_logits(network, validation), validation_labels.numpy())
    attention = None
    with torch.inference_mode():
        output = network(validation)
    if output.scale_attention is not None:
        attention = dict(zip(network.scale_names, output.scale_attention.float().mean(dim=0).tolist(), strict=True))
    return auc, attention


def test_macro_context_decides_and_attention_names_macro(tasks):
    auc, attention = trained("m3net", tasks["macro"])
    assert auc >= 0.9, f"m3net AUC {auc:.3f} on the macro task"
    assert attention["macro"] > 0.5, f"mean attention {attention}"


def test_the_micro_view_alone_cannot_solve_the_macro_task(tasks):
    auc, _ = trained("single-micro", tasks["macro"])
    assert auc <= 0.65, f"single-micro AUC {auc:.3f}: the task leaks into the micro view"


def test_micro_texture_decides_and_attention_names_micro(tasks):
    auc, attention = trained("m3net", tasks["micro"])
    assert auc >= 0.9, f"m3net AUC {auc:.3f} on the micro task"
    assert attention["micro"] > 0.5, f"mean attention {attention}"
