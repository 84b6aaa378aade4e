"""``m3net bundle --out``: a model file anywhere with its card and sha256, and the user's registry for --model."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources

import pytest

from m3netcore.checkpoint import ModelFileError, file_sha256, load_model, read_model_file
from m3netcore.cli import main
from m3netcore.errors import M3NetInputError
from m3netcore.user_models import register_model, user_registry_folder


def _package_weights_digest() -> str:
    weights = resources.files("m3netcore") / "weights"
    digest = hashlib.sha256()
    for entry in sorted(weights.iterdir(), key=lambda e: e.name):
        if entry.is_file():
            digest.update(entry.name.encode() + entry.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def run_folder(untrained_model_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(untrained_model_file, run / "model.safetensors")
    return run


def test_bundle_writes_the_file_prints_card_and_sha256_and_registers_it_outside_the_package(
    run_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("M3NET_MODELS", str(tmp_path / "my-models"))
    package_before = _package_weights_digest()
    out = tmp_path / "anywhere" / "tiny.safetensors"
    out.parent.mkdir()
    code = main(["bundle", str(run_folder), "--name", "tiny-x", "--version", "3", "--out", str(out),
                 "--note", "Made by a test.", "--register"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    digest = file_sha256(out)
    assert f"sha256   {digest}" in printed and f"wrote {out}" in printed
    assert printed.startswith("# Bundled model `tiny-x` 3\n\nMade by a test.")  # the card comes first
    registry = json.loads((tmp_path / "my-models" / "registry.json").read_text())
    assert registry == {"tiny-x": {"file": str(out.resolve()), "sha256": digest, "version": "3"}}
    model = load_model("tiny-x")  # found by name through the user's registry
    assert (model.name, model.version) == ("m3net-tiny-x", "3")
    assert model.temperature == read_model_file(run_folder / "model.safetensors").temperature
    assert _package_weights_digest() == package_before  # nothing written into the installed package
    # predict-many's workers get the registered file itself (they may run where the registry is not)
    from m3netcore.batch import model_for_workers

    assert model_for_workers("tiny-x") == str(out.resolve())
    assert model_for_workers("demo") == "demo"


def test_a_registered_file_changed_afterwards_fails_its_checksum(run_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("M3NET_MODELS", str(tmp_path / "reg"))
    out = tmp_path / "m.safetensors"
    assert main(["bundle", str(run_folder), "--name", "m", "--version", "1", "--out", str(out), "--register"]) == 0
    shutil.copy(run_folder / "model.safetensors", out)  # another file under the registered name
    with pytest.raises(ModelFileError, match="'m' .* failed its checksum"):
        load_model("m")
    out.unlink()
    with pytest.raises(ModelFileError, match="missing its file"):
        load_model("m")


def test_bundled_names_keep_priority_and_bad_outputs_are_refused(run_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("M3NET_MODELS", str(tmp_path / "reg"))
    with pytest.raises(M3NetInputError, match="'demo' is the name of a bundled model"):
        register_model("demo", run_folder / "model.safetensors", "0" * 64, "1")
    assert not (tmp_path / "reg" / "registry.json").exists()
    assert main(["bundle", str(run_folder), "--name", "x", "--version", "1", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["bundle", str(tmp_path), "--name", "x", "--version", "1", "--out", str(tmp_path / "x")]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_the_registry_folder_is_the_environment_variable_or_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("M3NET_MODELS", str(tmp_path / "a"))
    assert user_registry_folder() == tmp_path / "a"
    monkeypatch.delenv("M3NET_MODELS")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert user_registry_folder() == tmp_path / "config" / "m3net" / "models"
