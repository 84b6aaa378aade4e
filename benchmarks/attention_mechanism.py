"""Does M3Net's scale attention single out the scale that decides? A mechanism check.

Generated data (no patient images, :mod:`m3netcore.data.mechanism`): a nodule in lung
and a label only one field of view can see (macro: a blob 34-42 mm away; micro: 1.5 mm
stripes inside the nodule). For each task and two seeds, M3Net is trained (320 nodules,
12 epochs) and validated (128), and the table shows the validation AUC and the mean
attention per scale; ``single-micro`` on the macro task shows that the micro view alone
cannot decide it. ``Testing/core/test_mechanism.py`` asserts the same for one seed.

Run: ``.venv/bin/python benchmarks/attention_mechanism.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import torch

from m3netcore.crops import default_preprocessing
from m3netcore.data.mechanism import mechanism_dataset
from m3netcore.metrics import roc_auc
from m3netcore.models import build_model
from m3netcore.train.loop import TrainConfig, predict_logits, train

PREPROCESSING = default_preprocessing()
SCALES = PREPROCESSING.scale_names


def dataset(count: int, seed: int, task: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    return mechanism_dataset(count, seed, task, PREPROCESSING)


def run(name: str, task_data, seed: int) -> tuple[float, dict[str, float]]:
    (train_views, train_labels), (validation_views, validation_labels) = task_data
    torch.manual_seed(seed)
    network = build_model(name)
    chosen = [SCALES.index(s) for s in network.scale_names]
    config = TrainConfig(epochs=12, batch_size=32, learning_rate=2e-3, seed=seed)
    train(network, [train_views[i] for i in chosen], train_labels, config, log=lambda _: None)
    validation = [validation_views[i] for i in chosen]
    auc = roc_auc(predict_logits(network, validation), validation_labels.numpy())
    with torch.inference_mode():
        attention = network(validation).scale_attention.float().mean(dim=0).tolist()
    return auc, dict(zip(network.scale_names, attention, strict=True))


def main() -> None:
    print(f"{'task':<6} {'model':<13} {'seed':>4} {'AUC':>6} {'micro':>6} {'meso':>6} {'macro':>6}")
    for task in ("macro", "micro"):
        data = (dataset(320, 1, task), dataset(128, 2, task))
        runs = [("m3net", 0), ("m3net", 1)] + ([("single-micro", 0)] if task == "macro" else [])
        for name, seed in runs:
            auc, attention = run(name, data, seed)
            cells = " ".join(f"{attention.get(s, float('nan')):>6.3f}" for s in SCALES)
            print(f"{task:<6} {name:<13} {seed:>4} {auc:>6.3f} {cells}", flush=True)


if __name__ == "__main__":
    main()
