"""The training losses beside the main one: cross-scale mutual information, per-scale votes.

Cross-scale mutual information: InfoNCE between the scale embeddings of each nodule.

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


def scale_vote_loss(scale_logits: Tensor, target: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Mean binary cross-entropy of every scale's own vote against the label.

    Each vote must predict the label from its own view alone, so a view that cannot tell the
    classes apart votes near the prior, and only an attention weight on a view that can
    decide lowers the main loss. This is what makes M3Net's scale attention name the
    deciding view (see :class:`m3netcore.models.m3net.M3Net`).

    Args:
        scale_logits: ``(B, S)``, ``ModelOutput.scale_logits``.
        target: ``(B,)`` 0/1 labels.
        pos_weight: as for the main loss (class balance).
    """
    if scale_logits.ndim != 2:
        raise ValueError(f"scale_logits must be (B, S), got shape {tuple(scale_logits.shape)}")
    targets = target.float()[:, None].expand_as(scale_logits)
    return F.binary_cross_entropy_with_logits(scale_logits.float(), targets, pos_weight=pos_weight)
