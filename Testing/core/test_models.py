"""Every registered architecture: forward, backward, no NaN, the common surface, its cost."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import m3netcore as m3
from m3netcore.checkpoint import Model
from m3netcore.models import ARCHITECTURES, build_model
from m3netcore.summary import model_summary

SMALL = 16  # voxels a side: enough for every encoder, fast on a CPU


def small_views(network, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, SMALL, SMALL, SMALL, generator=generator) for _ in network.scale_names]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_backward_without_nan(name):
    torch.manual_seed(0)
    network = build_model(name).train()
    output = network(small_views(network))
    assert output.logit.shape == (4,)
    assert torch.isfinite(output.logit).all()
    loss = output.logit.sum()
    if output.embeddings is not None:  # the projection heads feed only the InfoNCE term
        loss = loss + output.embeddings.pow(3).sum()
    loss.backward()
    grads = [p.grad for p in network.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_common_surface(name):
    network = build_model(name).eval()
    views = small_views(network, batch=2)
    with torch.inference_mode():
        features = network.forward_features(views)
        head = network.forward_head(features)
        full = network(views)
    assert features.shape[:2] == (2, len(network.scale_names))
    assert torch.allclose(head.logit, full.logit)
    assert set(network.cam_layers()) == set(network.scale_names)
    if full.scale_attention is not None:
        assert full.scale_attention.shape == (2, len(network.scale_names))
        assert torch.allclose(full.scale_attention.sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="view"):
        network.forward_features(views + views)


def test_unknown_name_fails_listing_known():
    with pytest.raises(ValueError, match="unknown model architecture 'm4net'.*m3net"):
        build_model("m4net")
    with pytest.raises(ValueError, match="unknown config field"):
        build_model("m3net", {"widthz": (8, 8)})


def test_m3net_embeddings_are_unit_vectors_in_one_space():
    network = build_model("m3net").eval()
    with torch.inference_mode():
        output = network(small_views(network))
    assert output.embeddings.shape == (4, 3, network.config.projection_dim)
    assert torch.allclose(output.embeddings.norm(dim=-1), torch.ones(4, 3), atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("stem_width", 8), ("widths", (16, 24)), ("token_dim", 32), ("projection_dim", 16), ("patch", 2)],
)
def test_each_m3net_config_field_changes_the_network(field, value):
    default = build_model("m3net")
    changed = build_model("m3net", {field: value})
    default_shapes = {k: tuple(v.shape) for k, v in default.state_dict().items()}
    changed_shapes = {k: tuple(v.shape) for k, v in changed.state_dict().items()}
    assert default_shapes != changed_shapes


def test_query_scale_and_dropout_are_used():
    config = dataclasses.replace(m3.models.M3NetConfig(), query_scale="micro", dropout=0.5)
    network = m3.models.M3Net(config)
    assert network._query_index == 0
    assert network.dropout.p == 0.5
    with pytest.raises(ValueError, match="query_scale"):
        m3.models.M3NetConfig(query_scale="nano")


def test_attention_depends_on_the_query_scale_view():
    torch.manual_seed(0)
    network = build_model("m3net").eval()
    views = small_views(network, batch=1)
    with torch.inference_mode():
        before = network(views).scale_attention
        views[2] = views[2] * 0.0  # change only the macro view: the query
        after = network(views).scale_attention
    assert not torch.allclose(before, after)


def test_m3net_cost_is_under_one_gflop_and_resnet18x3_matches_the_authors_shape():
    m3net = model_summary(Model.untrained("m3net"))
    assert m3net["gflops"] <= 1.0
    resnet = Model.untrained("resnet18x3")
    parameters = sum(p.numel() for p in resnet.network.parameters())
    # The authors report 99.9 M parameters for their fusion model of three ResNet-18s.
    assert 95e6 < parameters < 105e6
    assert [s.grid for s in resnet.preprocessing.scales] == [(32, 32, 56), (64, 64, 56), (96, 96, 56)]
