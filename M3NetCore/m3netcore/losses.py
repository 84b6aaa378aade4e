"""Cross-scale mutual information: InfoNCE between the scale embeddings of each nodule.

For every pair of scales (micro-meso, meso-macro, micro-macro) the embedding of a nodule
at one scale must pick out the same nodule's embedding at the other scale among all
nodules of the batch (van den Oord et al., 2018; the symmetric form of CLIP/SimCLR). This
maximises a lower bound on the mutual information between the scales' representations,
capped at ``log(batch size)``: small batches weaken it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_scale_infonce(embeddings: Tensor, temperature: float = 0.1) -> Tensor:
    """Mean symmetric InfoNCE over all pairs of scales.

    Args:
        embeddings: ``(B, S, P)`` L2-normalised projections (``ModelOutput.embeddings``).
        temperature: softmax temperature of the similarity logits.

    Returns:
        A scalar tensor; 0 when ``B < 2`` or ``S < 2`` (nothing to contrast).
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (B, S, P), got shape {tuple(embeddings.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    batch, scales, _ = embeddings.shape
    if batch < 2 or scales < 2:
        return embeddings.sum() * 0.0
    targets = torch.arange(batch, device=embeddings.device)
    losses = []
    for i, j in itertools.combinations(range(scales), 2):
        logits = embeddings[:, i] @ embeddings[:, j].T / temperature
        losses.append(0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)))
    return torch.stack(losses).mean()
