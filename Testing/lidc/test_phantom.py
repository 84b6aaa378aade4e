"""LIDC-phantom: intensities from what a CT shows, never from malignancy; deterministic; cached."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import rectangle, write_database

from m3netcore.crops import default_preprocessing
from m3netcore.data.cache import open_cache, pyramid_specs
from m3netcore.data.lidc import load_nodules
from m3netcore.data.manifest import read_rows_csv
from m3netcore.data.phantom import nodule_appearance, render_nodule_cubes
from m3netcore.data.phantom_cache import build_phantom_cache, preview_indices

PREPROCESSING = default_preprocessing()
SPECS = pyramid_specs(PREPROCESSING)


# Slices 0.4 of a step off any multiple of the spacing, as in most real scans.
Z_POSITIONS = tuple(-100.5 + 1.25 * k for k in range(40))


def disc_reader(malignancy=4, texture=5, calcification=6, margin=4, internal=1):
    # wider (13 columns) than tall (5 rows): a row/column swap would show
    contours = [(Z_POSITIONS[k], rectangle(200, 220, 6, 2), True) for k in range(14, 22)]
    return {"malignancy": malignancy, "texture": texture, "calcification": calcification, "margin": margin,
            "internalStructure": internal, "contours": contours}  # fmt: skip


@pytest.fixture
def nodule(tmp_path):
    (found,) = load_nodules(
        write_database(tmp_path / "db.sqlite", [disc_reader(), disc_reader()], z_positions=Z_POSITIONS)
    )
    return found


def with_ratings(nodule, **ratings):
    annotations = tuple(dataclasses.replace(a, ratings=a.ratings | ratings) for a in nodule.annotations)
    return dataclasses.replace(nodule, annotations=annotations)


def test_malignancy_and_subtlety_never_change_the_image(nodule):
    cubes, _ = render_nodule_cubes(nodule, SPECS, PREPROCESSING, seed=3)
    relabelled, _ = render_nodule_cubes(with_ratings(nodule, malignancy=1, subtlety=5), SPECS, PREPROCESSING, seed=3)
    for scale in cubes:
        assert np.array_equal(cubes[scale], relabelled[scale])


def test_texture_sets_density_and_calcification_brightens(nodule):
    solid, _ = render_nodule_cubes(nodule, SPECS, PREPROCESSING, seed=3)
    glass, _ = render_nodule_cubes(with_ratings(nodule, texture=1), SPECS, PREPROCESSING, seed=3)
    calcified, _ = render_nodule_cubes(with_ratings(nodule, calcification=3), SPECS, PREPROCESSING, seed=3)
    core = (slice(21, 27), slice(23, 25), slice(19, 29))  # z, y, x: well inside the 8 x 2 x 10 mm nodule
    assert solid["micro"][core].mean() > -100.0
    assert -800.0 < glass["micro"][core].mean() < -500.0
    assert calcified["micro"][core].mean() > 300.0
    assert nodule_appearance(with_ratings(nodule, texture=1))["density_hu"] == pytest.approx(-700.0)


def test_deterministic_for_a_seed_and_centred(nodule):
    first, centre = render_nodule_cubes(nodule, SPECS, PREPROCESSING, seed=5)
    again, _ = render_nodule_cubes(nodule, SPECS, PREPROCESSING, seed=5)
    other, _ = render_nodule_cubes(nodule, SPECS, PREPROCESSING, seed=6)
    assert np.array_equal(first["micro"], again["micro"])
    assert not np.array_equal(first["micro"], other["micro"])
    # the phantom's grid is the scan's: x = column * spacing, y = row * spacing, z = slice z
    assert centre == pytest.approx((200 * 0.7, 220 * 0.7, Z_POSITIONS[14] + 1.25 * 3.5))
    # the nodule (about 8 x 2 x 10 mm) near the cube's centre; vessels may pass further out
    middle = first["micro"][12:36, 12:36, 12:36]
    bright = np.argwhere(middle > -300.0) + 12
    assert np.abs(bright.mean(axis=0) - 23.5).max() < 0.4  # 0.3 mm at 0.75 mm voxels
    extent = np.ptp(bright, axis=0) + 1  # z, y, x in 0.75 mm voxels
    assert extent[2] > 2 * extent[1]  # wide in x (columns), narrow in y (rows)


def test_negative_seed_is_refused(tmp_path):
    from m3netcore.errors import M3NetInputError

    with pytest.raises(M3NetInputError, match="non-negative"):
        build_phantom_cache(tmp_path / "phantom", seed=-1, log=lambda _: None)


def test_cache_from_the_real_database(tmp_path, monkeypatch, lidc_cache_dir, lidc_table):
    monkeypatch.setenv("M3NET_CACHE_DIR", str(lidc_cache_dir))  # the session's computed table
    out = tmp_path / "phantom"
    path = build_phantom_cache(out, seed=0, limit=6, workers=2, log=lambda _: None)
    cache = open_cache(path)
    assert cache.semi_synthetic and "SEMI-SYNTHETIC" in cache.info["description"]
    assert len(cache) == 6 and cache.info["seed"] == 0
    assert (path / "preview.png").stat().st_size > 10_000
    listed = read_rows_csv(path / "preview.csv")
    assert [r["nodule_id"] for r in listed] == [cache.rows[i]["nodule_id"] for i in preview_indices(6)]
    assert {"texture_ratings", "margin_ratings", "malignancy_ratings"} <= set(listed[0])
    for scale, cubes in cache.pyramids.items():
        assert cubes.dtype == np.int16 and cubes.shape == (6, 48, 48, 48), scale
    assert {"label_mean-excl3", "fold", "centre_x_lps", "phantom_density_hu"} <= set(cache.rows[0])
    assert [r["nodule_id"] for r in cache.rows] == [r["nodule_id"] for r in lidc_table[:6]]
    assert [r["fold"] for r in cache.rows] == [r["fold"] for r in lidc_table[:6]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    with pytest.raises(Exception, match="already exists"):
        build_phantom_cache(out, limit=1, log=lambda _: None)


def test_a_cache_for_another_architectures_views(tmp_path, monkeypatch, lidc_cache_dir, lidc_table, capsys):
    import torch

    from m3netcore.cli import main
    from m3netcore.models.registry import architecture
    from m3netcore.train.config import RunConfig
    from m3netcore.train.dataset import ViewSource

    monkeypatch.setenv("M3NET_CACHE_DIR", str(lidc_cache_dir))
    out = tmp_path / "resnet-phantom"
    assert main(["lidc", "phantom", "--model", "resnet18x3", "--limit", "2", "--workers", "1", "--out", str(out)]) == 0
    cache = open_cache(out)
    resnet = architecture("resnet18x3").preprocessing()
    for spec in pyramid_specs(resnet):  # 1 mm cubes, 1.5 x the authors' 32/64/96 x 56 mm views
        assert cache.pyramids[spec.name].shape == (2, *spec.tensor_shape), spec.name
    ViewSource(cache, resnet, RunConfig(), torch.device("cpu"))  # the model can train on it
    with pytest.raises(Exception, match="micro"):
        ViewSource(cache, PREPROCESSING, RunConfig(), torch.device("cpu"))  # M3Net's views cannot
    assert main(["lidc", "phantom", "--model", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert "nonsense" in capsys.readouterr().err and not (tmp_path / "x").exists()
