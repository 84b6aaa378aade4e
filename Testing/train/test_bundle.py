"""Bundling a finished run as a named model of the package (its registry entry and checksum)."""

from __future__ import annotations

import json

import pytest

from m3netcore.checkpoint import file_sha256, read_model_file
from m3netcore.errors import M3NetInputError
from m3netcore.train.bundle import bundle_run
from m3netcore.train.config import RunConfig
from m3netcore.train.run import train_run


def test_a_run_becomes_a_registered_model_with_its_card(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train_run(tiny_cache, "m3net", 0, run, RunConfig(epochs=1, batch_size=8, log_every=100), device="cpu",
              log=lambda _: None)  # fmt: skip
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "registry.json").write_text(json.dumps({"demo": {"file": "x", "sha256": "0", "version": "1"}}))
    report = tmp_path / "summary.md"
    report.write_text("# Cross-validation of m3net\n\nAUC 0.5\n")
    entry = bundle_run(run, "tiny", "9.9", note="Made by a test.", report=report, weights=weights)
    registry = json.loads((weights / "registry.json").read_text())
    assert set(registry) == {"demo", "tiny"}  # other entries stay
    assert registry["tiny"] == {"file": "m3net-tiny.safetensors", "sha256": entry["sha256"], "version": "9.9"}
    assert file_sha256(weights / "m3net-tiny.safetensors") == entry["sha256"]
    model = read_model_file(weights / "m3net-tiny.safetensors")
    original = read_model_file(run / "model.safetensors")
    assert (model.name, model.version) == ("m3net-tiny", "9.9")
    assert model.card.startswith("# Bundled model `tiny` 9.9\n\nMade by a test.")
    assert original.card in model.card and model.temperature == original.temperature
    assert model.card.endswith("\n## Cross-validation of m3net\n\nAUC 0.5\n")  # the report, a section of the card
    with pytest.raises(M3NetInputError, match="no report file"):
        bundle_run(run, "tiny", "9.9", report=tmp_path / "missing.md", weights=weights)


def test_a_folder_without_a_finished_run_is_refused(tmp_path):
    with pytest.raises(M3NetInputError, match="no finished run"):
        bundle_run(tmp_path, "x", "1", weights=tmp_path)
