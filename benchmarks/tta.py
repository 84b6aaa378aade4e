"""Does test-time augmentation help? The 16 grid symmetries training draws, averaged, on a finished cv folder.

Training mirrors each axis and swaps the two in-plane axes at random (``train/loop.py``:
exact symmetries of the isotropic views). This scores every fold model's validation and
test nodules once as they are and once averaged over all 16 of those symmetries (the
logits' mean), recalibrates each fold on its own validation split as ``m3net cv`` does,
averages each fold's seeds, pools, and prints both pooled AUCs with the paired
patient-bootstrap difference (TTA minus plain) and each one's difference to the
diameter-only regression, on the same nodules::

    .venv/bin/python benchmarks/tta.py --data PHANTOM --cv CVDIR [--seeds 2]

It prints a table; it is not a test. Inference only: seconds per fold on a CPU.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from m3netcore.checkpoint import load_model
from m3netcore.data.baselines import reference_scores
from m3netcore.data.cache import open_cache
from m3netcore.errors import M3NetInputError
from m3netcore.evaluation.comparison import paired_by_nodule
from m3netcore.evaluation.cv import DIAMETER_ROW, _run_config_of, finished_seeds, seed_run_folder
from m3netcore.evaluation.pooling import average_logits, fit_recalibration
from m3netcore.metrics import roc_auc
from m3netcore.train.config import RunConfig
from m3netcore.train.dataset import ViewSource, split_cache
from m3netcore.train.run import MODEL_FILE

SYMMETRIES = list(itertools.product((False, True), (False, True), (False, True), (False, True)))  # flips z,y,x; swap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the cache the cv folder was trained on")
    parser.add_argument("--cv", required=True, help="a finished `m3net cv` folder")
    parser.add_argument("--seeds", type=int, help="seeds per fold to use (default: every finished one)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    cache = open_cache(args.data)
    folds, seeds = finished_seeds(args.cv)
    seeds = seeds[: args.seeds] if args.seeds else seeds
    pooled = {"plain": {}, "tta": {}}
    labels, patients, protocol = {}, {}, None
    for fold in folds:
        per_seed = {"plain": [], "tta": []}
        for k, seed in enumerate(seeds):
            run = seed_run_folder(Path(args.cv), fold, k, seed)
            config = _run_config_of(run)
            protocol = config.protocol
            split = split_cache(cache, protocol, fold, validation_folds=config.validation_folds, seed=config.seed)
            model = load_model(run / MODEL_FILE)
            source = ViewSource(cache, model.preprocessing, RunConfig(), torch.device("cpu"))
            for how in ("plain", "tta"):
                validation = scores(model, source, split.validation, how == "tta")
                recalibrate = fit_recalibration(validation, split.labels_of(split.validation))
                per_seed[how].append(recalibrate(scores(model, source, split.test, how == "tta")))
        ids = [str(cache.rows[i]["nodule_id"]) for i in split.test]
        for how in ("plain", "tta"):
            pooled[how].update(zip(ids, average_logits(per_seed[how]), strict=True))
        labels.update(zip(ids, split.labels_of(split.test).tolist(), strict=True))
        patients.update((n, str(cache.rows[i]["patient_id"])) for n, i in zip(ids, split.test, strict=True))
        fold_auc = {how: roc_auc(np.array([pooled[how][n] for n in ids]), np.array([labels[n] for n in ids]))
                    for how in pooled}  # fmt: skip
        print(f"fold {fold}: plain {fold_auc['plain']:.3f}, TTA {fold_auc['tta']:.3f} ({len(seeds)} seeds)", flush=True)
    try:
        diameter = {str(k): v for k, v in reference_scores(cache.rows, protocol, DIAMETER_ROW).items()}
    except M3NetInputError:  # a cache without diameters
        diameter = None
    ids = sorted(labels)
    print(f"\n{args.cv}, protocol {protocol}, {len(ids)} nodules, {len(folds)} folds x {len(seeds)} seeds, "
          f"{time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print("| scoring | pooled AUC | vs diameter only (95% CI) | vs plain (95% CI) |\n| --- | ---: | --- | --- |")
    for how, name in (("plain", "as trained (one view)"), ("tta", "mean logit over the 16 symmetries")):
        auc = roc_auc(np.array([pooled[how][n] for n in ids]), np.array([labels[n] for n in ids]))
        versus = paired_by_nodule(pooled[how], diameter, labels, patients) if diameter else None
        plain = paired_by_nodule(pooled[how], pooled["plain"], labels, patients) if how == "tta" else None
        print(f"| {name} | {auc:.3f} | {interval(versus)} | {interval(plain)} |")


def scores(model, source: ViewSource, indices: np.ndarray, tta: bool, batch: int = 128) -> np.ndarray:
    """The network's logits for the nodules ``indices``: plain, or averaged over the 16 symmetries."""
    network = model.network.eval()
    out = []
    for begin in range(0, len(indices), batch):
        views = source.views(indices[begin : begin + batch])
        chosen = SYMMETRIES if tta else SYMMETRIES[:1]
        logits = [network([transformed(view, symmetry) for view in views]).logit.float() for symmetry in chosen]
        out.append(torch.stack(logits).mean(0).double().numpy())
    return np.concatenate(out)


def transformed(view: torch.Tensor, symmetry: tuple[bool, bool, bool, bool]) -> torch.Tensor:
    axes = [2 + axis for axis, flip in enumerate(symmetry[:3]) if flip]
    view = view.flip(axes) if axes else view
    return view.transpose(3, 4) if symmetry[3] else view


def interval(result: dict | None) -> str:
    if result is None:
        return ""
    low, high = result["ci"]
    star = " *" if result["excludes_zero"] else ""
    return f"{result['difference']:+.3f} ({low:+.3f} to {high:+.3f}){star}"


if __name__ == "__main__":
    main()
