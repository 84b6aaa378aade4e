"""M3Net: macro-to-meso-to-micro multi-scale 3D network for lung nodule classification.

Li et al., "M3Net: A Macro-to-Meso-to-Micro Clinical-inspired Hierarchical 3D Network for
Pulmonary Nodule Classification", Information Fusion 2026 (arXiv 2605.12570). From the
paper's description: progressive multi-scale input, scale-specific encoders, cross-scale
consistency through projection into a shared latent space with mutual-information
maximisation (:mod:`m3netcore.losses`), and fusion of the scales. The fusion here is
attention over the three scale tokens whose query comes from the macro token, the way a
radiologist reads from the whole lung down to the nodule; its weights are the per-nodule
"which scale mattered" explanation.

What the attention weighs is each scale's own vote (a logit from that scale's token),
and each vote is trained to predict the label from its scale alone
(:func:`m3netcore.losses.scale_vote_loss`). An earlier form weighed value vectors and
classified their mix: its weights could carry the label themselves (the macro query "routes"
benign nodules to the meso token), and on generated data where only macro context decides
it gave the useless meso view 0.49 of the attention. With anchored votes a view that
cannot tell the classes apart votes near the prior, so the main loss falls only when the
weight goes to the view that can: the weights name the deciding view
(``Testing/core/test_mechanism.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3netcore.models.encoder import ScaleEncoder
from m3netcore.models.output import ModelOutput


@dataclass(frozen=True)
class M3NetConfig:
    """Hyper-parameters of :class:`M3Net`.

    Args:
        scale_names: the views in input order; the query scale must be among them.
        query_scale: the view whose token asks which scales matter (macro: context first).
        stem_width, widths, patch: each :class:`ScaleEncoder`'s shape.
        token_dim: width of the scale tokens the fusion attends over (and votes from).
        projection_dim: width of the shared, L2-normalised latent space (InfoNCE).
        dropout: on the value vectors, before the votes.
    """

    scale_names: tuple[str, ...] = ("micro", "meso", "macro")
    query_scale: str = "macro"
    stem_width: int = 24
    widths: tuple[int, ...] = (32, 48)
    patch: int = 4
    token_dim: int = 64
    projection_dim: int = 64
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.query_scale not in self.scale_names:
            raise ValueError(f"query_scale {self.query_scale!r} is not one of {self.scale_names}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class M3Net(nn.Module):
    """Three scale-specific encoders, shared latent projections, attention fusion.

    Args:
        config: see :class:`M3NetConfig`.
    """

    def __init__(self, config: M3NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or M3NetConfig()
        cfg = self.config
        self.scale_names = tuple(cfg.scale_names)
        self.encoders = nn.ModuleDict(
            {name: ScaleEncoder(cfg.stem_width, cfg.widths, cfg.patch) for name in self.scale_names}
        )
        feature_dim = cfg.widths[-1]
        self.tokenizers = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(feature_dim, cfg.token_dim), nn.LayerNorm(cfg.token_dim))
                for name in self.scale_names
            }
        )
        self.projections = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Linear(feature_dim, feature_dim),
                    nn.ReLU(inplace=True),
                    nn.Linear(feature_dim, cfg.projection_dim),
                )
                for name in self.scale_names
            }
        )
        self.scale_embedding = nn.Parameter(torch.zeros(len(self.scale_names), cfg.token_dim))
        self.query = nn.Linear(cfg.token_dim, cfg.token_dim)
        self.key = nn.Linear(cfg.token_dim, cfg.token_dim)
        self.value = nn.Linear(cfg.token_dim, cfg.token_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.vote = nn.Linear(cfg.token_dim, 1)  # one scale's logit from its own value vector
        self._query_index = self.scale_names.index(cfg.query_scale)

    def cam_layers(self) -> dict[str, nn.Module]:
        """Per scale, the module whose output Grad-CAM explains."""
        return {name: self.encoders[name].last_stage for name in self.scale_names}

    def forward_features(self, crops: Sequence[Tensor]) -> Tensor:
        """Encoder features ``(B, S, F)`` of the views, in ``scale_names`` order."""
        if len(crops) != len(self.scale_names):
            raise ValueError(f"expected {len(self.scale_names)} views, got {len(crops)}")
        return torch.stack(
            [self.encoders[name](x) for name, x in zip(self.scale_names, crops, strict=True)], dim=1
        )

    def forward_head(self, features: Tensor) -> ModelOutput:
        tokens = torch.stack(
            [self.tokenizers[name](features[:, i]) for i, name in enumerate(self.scale_names)], dim=1
        )
        tokens = tokens + self.scale_embedding
        query = self.query(tokens[:, self._query_index])  # (B, T)
        keys = self.key(tokens)  # (B, S, T)
        scores = torch.einsum("bst,bt->bs", keys, query) / math.sqrt(tokens.shape[-1])
        attention = scores.softmax(dim=1)
        votes = self.vote(self.dropout(self.value(tokens))).squeeze(-1)  # (B, S)
        logit = (attention * votes).sum(dim=1)
        embeddings = torch.stack(
            [F.normalize(self.projections[name](features[:, i]), dim=-1) for i, name in enumerate(self.scale_names)],
            dim=1,
        )
        return ModelOutput(logit=logit, scale_attention=attention, embeddings=embeddings, scale_logits=votes)

    def forward(self, crops: Sequence[Tensor]) -> ModelOutput:
        return self.forward_head(self.forward_features(crops))
