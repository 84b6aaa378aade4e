"""What every model's ``forward`` returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class ModelOutput(NamedTuple):
    """The common output of all registered models.

    Attributes:
        logit: ``(B,)`` malignancy logit (before temperature calibration).
        scale_attention: ``(B, S)`` fusion weights over the scales (rows sum to 1), or
            ``None`` for models that do not weigh scales (late-fusion baselines).
        embeddings: ``(B, S, P)`` L2-normalised per-scale projections into the shared
            latent space used by the cross-scale mutual-information loss, or ``None``.
        scale_logits: ``(B, S)`` each scale's own vote, for models whose ``logit`` is the
            attention-weighted sum of them (trained with :func:`m3netcore.losses.scale_vote_loss`),
            or ``None``.
    """

    logit: Tensor
    scale_attention: Tensor | None = None
    embeddings: Tensor | None = None
    scale_logits: Tensor | None = None
