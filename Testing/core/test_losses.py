"""Cross-scale InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m3netcore.losses import cross_scale_infonce


def unit(tensor):
    return F.normalize(tensor, dim=-1)


def test_aligned_scales_score_lower_than_unrelated_ones():
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(32, 1, 16, generator=generator)
    aligned = unit(shared.expand(32, 3, 16) + 0.05 * torch.randn(32, 3, 16, generator=generator))
    unrelated = unit(torch.randn(32, 3, 16, generator=generator))
    assert cross_scale_infonce(aligned) < 0.1
    assert cross_scale_infonce(unrelated) > 2.0
    # At temperature 1 unrelated unit vectors barely differ in similarity: the loss is
    # near log(B), the cap of the InfoNCE bound.
    assert cross_scale_infonce(unrelated, temperature=1.0) == pytest.approx(math.log(32), rel=0.05)


def test_gradient_pulls_the_scales_of_one_nodule_together():
    generator = torch.Generator().manual_seed(1)
    embeddings = unit(torch.randn(8, 3, 16, generator=generator)).requires_grad_(True)
    loss = cross_scale_infonce(embeddings)
    loss.backward()
    stepped = unit(embeddings.detach() - 0.5 * embeddings.grad)
    assert cross_scale_infonce(stepped) < loss.detach()


def test_degenerate_batches_and_bad_arguments():
    assert float(cross_scale_infonce(unit(torch.randn(1, 3, 8)))) == 0.0
    assert float(cross_scale_infonce(unit(torch.randn(4, 1, 8)))) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        cross_scale_infonce(unit(torch.randn(4, 3, 8)), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, S, P\)"):
        cross_scale_infonce(torch.randn(4, 8))
