"""`m3net demo` end to end, the bundled demo model, and the script that makes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import m3netcore as m3
from m3netcore import checkpoint
from m3netcore.cli import main
from m3netcore.points import read_points
from m3netcore.train.demo_weights import make_demo_model
from m3netcore.train.loop import TrainConfig


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


def test_demo_writes_every_output(demo_out):
    document = json.loads((demo_out / "results.json").read_text())
    assert [n["label"] for n in document["nodules"]] == ["N-1 suspicious", "N-2 calcified"]
    for nodule in document["nodules"]:
        assert 0.0 <= nodule["probability"] <= 1.0
        assert sum(nodule["scale_attention"].values()) == pytest.approx(1.0, abs=1e-5)
        assert set(nodule["heatmap_files"]) == {"micro", "meso", "macro", "combined"}
        for name in nodule["heatmap_files"].values():
            heatmap = sitk.ReadImage(str(demo_out / name))
            assert np.allclose(
                heatmap.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in heatmap.GetSize()]),
                nodule["point_lps"],
            )
    rows = (demo_out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("label,x_lps,y_lps,z_lps,probability") and len(rows) == 3
    assert [p.name for p in demo_out.glob(".*")] == [".m3net-files.json"]  # the record of the set; nothing temporary


def test_demo_points_file_opens_as_the_same_points(demo_out):
    document = json.loads((demo_out / "results.json").read_text())
    points = read_points(demo_out / "demo_points.mrk.json")
    assert [p.label for p in points] == [n["label"] for n in document["nodules"]]
    for point, nodule in zip(points, document["nodules"], strict=True):
        assert np.allclose(point.lps, nodule["point_lps"])


def test_demo_overview_png_shows_something(demo_out):
    import matplotlib.image

    pixels = matplotlib.image.imread(demo_out / "demo_overview.png")
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.1  # not a blank canvas


def test_demo_model_ranks_the_suspicious_nodule_above_the_calcified_one(demo_out):
    suspicious, calcified = json.loads((demo_out / "results.json").read_text())["nodules"]
    assert suspicious["probability"] > 0.5 > calcified["probability"]
    assert suspicious["prediction"] == "malignant" and calcified["prediction"] == "benign"


def test_bundled_demo_model_is_pinned_small_and_labelled():
    registry = checkpoint.bundled_registry()
    path = checkpoint.resources.files("m3netcore") / "weights" / registry["demo"]["file"]
    assert checkpoint.file_sha256(path) == registry["demo"]["sha256"]
    assert path.stat().st_size < 10 * 2**20
    model = m3.load_model("demo")
    assert model.architecture == "m3net"
    assert "NOT FOR CLINICAL USE" in model.card
    assert "Held-out test" in model.card
    assert 0.05 <= model.temperature <= 20


def test_a_checksum_mismatch_in_the_registry_is_refused(monkeypatch):
    registry = checkpoint.bundled_registry()
    tampered = {"demo": dict(registry["demo"], sha256="0" * 64)}
    monkeypatch.setattr(checkpoint, "bundled_registry", lambda: tampered)
    with pytest.raises(m3.ModelFileError, match="failed its checksum"):
        m3.load_model("demo")


def test_demo_weights_script_makes_a_loadable_model(tmp_path):
    out = tmp_path / "tiny-demo.safetensors"
    report = make_demo_model(
        out,
        train_count=48,
        validation_count=24,
        test_count=24,
        config=TrainConfig(epochs=1, batch_size=16),
        update_registry=False,
    )
    model = m3.load_model(out)
    assert model.name == "m3net-demo"
    assert model.temperature == pytest.approx(report["temperature"])
    assert f"AUC {report['test']['auc']:.3f}" in model.card
    assert model.metadata["training"]["train_count"] == 48
    assert checkpoint.file_sha256(out) == report["sha256"]
