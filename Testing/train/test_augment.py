"""The training views: identity = inference crop; one physical transform moves every scale alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3netcore.crops import ScaleSpec, default_preprocessing, extract_crops
from m3netcore.data.cache import CacheWriter, open_cache
from m3netcore.train.augment import SpatialTransform, check_views_fit, draw_transform, resample_views
from m3netcore.train.config import RunConfig
from m3netcore.train.dataset import ViewSource


def test_identity_view_equals_the_inference_crop(small_ct, phantom, tmp_path):
    """Training input of an untransformed nodule is what predict() feeds the network."""
    preprocessing = default_preprocessing()
    with CacheWriter(tmp_path / "one", 1, kind="test", semi_synthetic=True, description="one CT") as writer:
        writer.add(0, small_ct, phantom.NODULE_LPS, {"nodule_id": "n", "patient_id": "p", "fold": 0})
        writer.commit()
    source = ViewSource(open_cache(tmp_path / "one"), preprocessing, RunConfig(), torch.device("cpu"))
    views = source.views([0])
    crops = extract_crops(small_ct, phantom.NODULE_LPS, preprocessing)
    for name, view in zip(preprocessing.scale_names, views, strict=True):
        assert view.shape == (1, 1, 32, 32, 32)
        expected = torch.from_numpy(crops[name])
        assert expected.std() > 0.05  # a crop with structure, not a flat field
        # the cache rounds HU to int16: at most 0.5 HU of 1400, i.e. 3.6e-4
        assert torch.max(torch.abs(view[0, 0] - expected)) < 4e-4, name


def _marker_cubes(offset_mm: np.ndarray, specs: list[ScaleSpec]) -> list[torch.Tensor]:
    """Per scale, a cube (LPS-aligned, centred on 0) with a bright ball at ``offset_mm``."""
    cubes = []
    for spec in specs:
        axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(spec.grid[::-1], spec.spacing_mm[::-1], strict=True)]
        z, y, x = np.meshgrid(*axes, indexing="ij")
        distance = np.sqrt((x - offset_mm[0]) ** 2 + (y - offset_mm[1]) ** 2 + (z - offset_mm[2]) ** 2)
        cubes.append(torch.from_numpy(np.where(distance < 2.5 * spec.spacing_mm[0], 1000.0, 0.0))[None, None].float())
    return cubes


def _centroid_mm(view: np.ndarray, spec: ScaleSpec) -> np.ndarray:
    """Intensity centroid of a ``[z, y, x]`` view, as LPS (x, y, z) mm about the view centre."""
    weights = np.clip(view, 0, None)
    index = (np.indices(view.shape).reshape(3, -1) * weights.reshape(-1)).sum(axis=1) / weights.sum()
    return (index[::-1] - (np.asarray(spec.grid) - 1) / 2) * np.asarray(spec.spacing_mm)


def test_one_transform_moves_every_scale_through_the_same_physical_map():
    preprocessing = default_preprocessing()
    views = list(preprocessing.scales)
    stored = [ScaleSpec(s.name, tuple(1.5 * f for f in s.field_of_view_mm), (48, 48, 48)) for s in views]
    offset = np.array([5.0, -3.0, 2.0])  # the marker's LPS position in the stored cubes, mm
    cubes = _marker_cubes(offset, stored)
    rng = np.random.default_rng(4)
    drawn = draw_transform(rng, max_rotation_deg=30, flip=True, max_scale_change=0.1, max_shift_mm=2)
    assert not np.allclose(drawn.matrix, np.eye(3))
    out = resample_views(
        cubes, stored, views,
        torch.as_tensor(drawn.matrix[None], dtype=torch.float32),
        torch.as_tensor(drawn.shift_mm[None], dtype=torch.float32),
    )  # fmt: skip
    # p_cube = M p_view + t, so the marker appears at M^-1 (offset - t) in every view.
    expected = np.linalg.solve(drawn.matrix, offset - drawn.shift_mm)
    for spec, view in zip(views, out, strict=True):
        found = _centroid_mm(view[0, 0].numpy(), spec)
        assert np.allclose(found, expected, atol=0.35 * spec.spacing_mm[0]), (spec.name, found, expected)


def test_a_flip_of_x_mirrors_lps_x():
    preprocessing = default_preprocessing()
    views = list(preprocessing.scales)[:1]
    stored = [ScaleSpec("micro", (36.0, 36.0, 36.0), (48, 48, 48))]
    cubes = _marker_cubes(np.array([6.0, 0.0, 0.0]), stored)
    flip_x = SpatialTransform(np.diag([-1.0, 1.0, 1.0]), np.zeros(3))
    out = resample_views(cubes, stored, views, torch.tensor(flip_x.matrix[None]).float(), torch.zeros(1, 3))
    assert np.allclose(_centroid_mm(out[0][0, 0].numpy(), views[0]), [-6.0, 0.0, 0.0], atol=0.1)


def test_views_that_the_cache_cannot_give_are_refused():
    view = ScaleSpec("micro", (24.0, 24.0, 24.0), (32, 32, 32))
    with pytest.raises(ValueError, match="voxels"):
        check_views_fit([ScaleSpec("micro", (36.0, 36.0, 36.0), (36, 36, 36))], [view])
    with pytest.raises(ValueError, match="larger"):
        check_views_fit([ScaleSpec("micro", (12.0, 12.0, 12.0), (16, 16, 16))], [view])


def test_augmentation_depends_on_seed_epoch_and_nodule_only(tiny_cache):
    config = RunConfig(seed=3)
    source = ViewSource(open_cache(tiny_cache), default_preprocessing(), config, torch.device("cpu"))
    alone = source.views([5], epoch=2)
    in_a_batch = source.views([9, 5, 1], epoch=2)
    for a, b in zip(alone, in_a_batch, strict=True):
        assert torch.equal(a[0], b[1])  # the same view whatever the batch (or process) it is in
    other_epoch = source.views([5], epoch=3)
    untransformed = source.views([5])
    assert not torch.allclose(alone[0], other_epoch[0])
    assert not torch.allclose(alone[0], untransformed[0])
    for view in alone:
        assert 0.0 <= float(view.min()) and float(view.max()) <= 1.0


def test_hu_noise_is_independent_between_the_scales_and_scaled_per_nodule(tiny_cache):
    still = RunConfig(max_rotation_deg=0.0, flip=False, max_scale_change=0.0, max_shift_mm=0.0, hu_noise_std=20.0)
    source = ViewSource(open_cache(tiny_cache), default_preprocessing(), still, torch.device("cpu"))
    indices = [1, 2, 3, 4]
    noisy, clean = source.views(indices, epoch=0), source.views(indices)
    low, high = default_preprocessing().hu_window
    residuals = [((a - b) * (high - low)).double() for a, b in zip(noisy, clean, strict=True)]
    inside = [(b > 0.05) & (b < 0.95) for b in clean]  # away from the window's clipping
    for k in range(len(indices)):
        per_scale = [r[k][m[k]] for r, m in zip(residuals, inside, strict=True)]
        stds = [float(r.std()) for r in per_scale]
        assert 0.0 < min(stds) and max(stds) < 20.0 * 1.1  # N(0, std^2), std drawn from [0, 20] HU
        assert max(stds) / min(stds) < 1.1  # one std per nodule, for all its scales
        a, b = (residuals[0][k].flatten(), residuals[2][k].flatten())
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.05  # micro and macro noise unrelated


def test_untransformed_views_are_kept_within_the_budget_and_augmented_ones_never(tiny_cache):
    cache = open_cache(tiny_cache)
    source = ViewSource(cache, default_preprocessing(), RunConfig(), torch.device("cpu"), keep_untransformed=True)
    first = source.views([3, 4, 5])
    again = source.views([3, 4, 5])
    assert all(a is b for a, b in zip(first, again, strict=True))  # validation after each epoch: made once
    fresh = ViewSource(cache, default_preprocessing(), RunConfig(), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(first, fresh.views([3, 4, 5]), strict=True))
    assert fresh.views([3, 4, 5])[0] is not fresh.views([3, 4, 5])[0] and fresh._plain_bytes == 0  # not asked to keep
    assert all(a is not b for a, b in zip(source.views([3, 4, 5], epoch=0), source.views([3, 4, 5], epoch=0),
                                          strict=True))  # fmt: skip
    kept = source._plain_bytes
    assert kept == sum(v.numel() * 4 for v in first)
    source.KEEP_PLAIN_BYTES = kept  # full: another batch is made each time
    other = source.views([6])
    assert source.views([6])[0] is not other[0] and source._plain_bytes == kept
