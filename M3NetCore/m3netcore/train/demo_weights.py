"""Make the bundled demo model: M3Net trained on generated nodules (``python -m m3netcore.train.demo_weights``).

The data come from :mod:`m3netcore.data.synthetic`: each nodule is drawn with its lung
surroundings and labelled by the synthetic rule there. A training set, a validation set
(temperature calibration and the threshold) and a held-out test set are drawn with
different seeds; the model card reports the held-out numbers. The result is a
demonstration of the software, not a medical device: it has never seen a patient's CT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import REGISTRY_FILE, Model, save_model
from m3netcore.crops import Preprocessing, extract_crops
from m3netcore.data.synthetic import random_nodule, render_patch
from m3netcore.train.loop import TrainConfig, evaluate_logits, fit_temperature, predict_logits, train

DEMO_NAME = "demo"
DEMO_FILE = "m3net-demo.safetensors"
DEMO_VERSION = "0.2.0"
CLICK_JITTER_MM = 2.0
# Voxel sizes (x, y, z) of common chest CT protocols: thin-slice, isotropic, thick-slice.
SCANNER_SPACINGS_MM = ((0.7, 0.7, 1.25), (1.0, 1.0, 1.0), (0.8, 0.8, 2.0))


def synthetic_views(count: int, seed: int, preprocessing: Preprocessing) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``count`` generated nodules (half malignant) as views ``(N, 1, D, H, W)`` per scale, and labels.

    The point each view is centred on is jittered by up to ``CLICK_JITTER_MM`` per axis, as a
    user's click is never exactly at the nodule's centre, and each patch is drawn at one of
    ``SCANNER_SPACINGS_MM``, so the model meets the resampling of several scanners.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % 2).astype(np.int64)
    per_scale: dict[str, list[np.ndarray]] = {name: [] for name in preprocessing.scale_names}
    largest = max(max(s.field_of_view_mm) for s in preprocessing.scales)
    for label in labels:
        spacing = SCANNER_SPACINGS_MM[int(rng.integers(len(SCANNER_SPACINGS_MM)))]
        patch = render_patch(rng, random_nodule(rng, bool(label)), largest + 4 * CLICK_JITTER_MM, spacing)
        click = rng.uniform(-CLICK_JITTER_MM, CLICK_JITTER_MM, 3)
        for name, crop in extract_crops(patch, click, preprocessing).items():
            per_scale[name].append(crop.astype(np.float16))
    views = [torch.from_numpy(np.stack(per_scale[name]))[:, None] for name in preprocessing.scale_names]
    return views, torch.from_numpy(labels)


def make_demo_model(
    out: Path,
    *,
    train_count: int = 2000,
    validation_count: int = 400,
    test_count: int = 400,
    config: TrainConfig | None = None,
    update_registry: bool = True,
) -> dict:
    """Generate data, train, calibrate, test and write the demo model file; returns the report."""
    config = config or TrainConfig()
    started = time.perf_counter()
    model = Model.untrained("m3net")
    preprocessing = model.preprocessing
    train_views, train_labels = synthetic_views(train_count, 1, preprocessing)
    validation_views, validation_labels = synthetic_views(validation_count, 2, preprocessing)
    test_views, test_labels = synthetic_views(test_count, 3, preprocessing)
    data_seconds = time.perf_counter() - started
    history = train(model.network, train_views, train_labels, config)
    validation_logits = predict_logits(model.network, validation_views)
    temperature = fit_temperature(validation_logits, validation_labels.numpy())
    validation = evaluate_logits(validation_logits, validation_labels.numpy(), temperature)
    test = evaluate_logits(predict_logits(model.network, test_views), test_labels.numpy(), temperature)
    report = {
        "train_count": train_count,
        "validation": validation,
        "test": test,
        "temperature": temperature,
        "config": config.__dict__,
        "final_epoch": history[-1],
        "data_seconds": round(data_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    model.temperature = temperature
    model.threshold = 0.5
    model.name = "m3net-demo"
    model.version = DEMO_VERSION
    model.metadata = {"training": report}
    model.card = _card(report)
    digest = save_model(model, out)
    if update_registry:
        registry_path = out.parent / REGISTRY_FILE
        registry = json.loads(registry_path.read_text()) if registry_path.exists() else {}
        registry[DEMO_NAME] = {"file": out.name, "sha256": digest, "version": DEMO_VERSION}
        write_text_atomic(registry_path, json.dumps(registry, indent=2) + "\n")
    report["sha256"] = digest
    return report


def _card(report: dict) -> str:
    test, validation, config = report["test"], report["validation"], report["config"]
    return f"""# m3net-demo {DEMO_VERSION}

NOT FOR CLINICAL USE. A demonstration model for the M3NetSlicer software.

- Architecture: M3Net (micro 24 mm, meso 48 mm, macro 96 mm views on 32^3 grids; scale attention; cross-scale InfoNCE, lambda {config['mi_weight']}).
- Training data: {report['train_count']} generated nodules in generated lung surroundings (`m3netcore.data.synthetic`) at voxel sizes of {', '.join('x'.join(f'{v:g}' for v in s) for s in SCANNER_SPACINGS_MM)} mm, half labelled malignant by a synthetic rule (larger, lobulated, spiculated, soft-edged, sometimes part-solid) and half benign (small, smooth, sharp, often calcified). No patient data.
- Calibration: temperature {report['temperature']:.3f} fitted on {validation['count']} generated validation nodules (AUC {validation['auc']:.3f}).
- Held-out test ({test['count']} generated nodules, another seed): AUC {test['auc']:.3f}, accuracy {test['accuracy']:.3f}, log-loss {test['log_loss']:.3f}.
- These numbers say the software learns what the generator encodes; they say nothing about real nodules or patients.
- Made by `python -m m3netcore.train.demo_weights` ({config['epochs']} epochs, batch {config['batch_size']}, AdamW lr {config['learning_rate']}, seed {config['seed']}; torch {report['torch']}).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "weights" / DEMO_FILE
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--train-count", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = parser.parse_args(argv)
    report = make_demo_model(args.out, train_count=args.train_count, config=TrainConfig(epochs=args.epochs))
    print(json.dumps({k: report[k] for k in ("validation", "test", "temperature", "total_seconds", "sha256")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
