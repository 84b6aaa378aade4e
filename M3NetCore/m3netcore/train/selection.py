"""Which epoch's weights a run keeps: the best validation AUC, ties broken by validation loss.

On an easy split validation AUC saturates (1.000 from epoch 1) while the validation loss
keeps falling; a strict ``>`` on AUC alone then ships the first, under-trained epoch with
badly calibrated probabilities. Ranking by (AUC, then lower loss, then the later epoch)
keeps the model that is at least as good on both.
"""

from __future__ import annotations

import math


def is_better_epoch(row: dict, best: dict) -> bool:
    """Whether the epoch of ``row`` should replace ``best`` as the selected one.

    Args:
        row: this epoch's metrics, with ``val_auc`` and ``val_loss``.
        best: the epoch selected so far, with ``val_auc`` and (from runs begun before this
            rule, possibly missing) ``val_loss``; ``val_auc`` is ``-inf`` before the first.

    Returns:
        True if ``row`` has the higher validation AUC, or the same AUC and a validation loss
        no higher (equal numbers: the later epoch, ``row``, wins). A non-finite AUC or loss
        never wins.
    """
    auc, loss = float(row["val_auc"]), float(row["val_loss"])
    if not (math.isfinite(auc) and math.isfinite(loss)):
        return False
    best_auc, best_loss = float(best["val_auc"]), float(best.get("val_loss", math.inf))
    if auc != best_auc:
        return auc > best_auc
    return not loss > best_loss
