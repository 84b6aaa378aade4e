"""m3netcore.checkpoint: model files (safetensors + metadata + checksums) and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from m3netcore import Model, ModelFileError, load_model, save_model
from m3netcore.checkpoint import METADATA_KEY, file_sha256, read_model_file


def crops_batch(model: Model, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(batch, 1, *spec.tensor_shape, generator=generator) for spec in model.preprocessing.scales]


@pytest.fixture
def saved(tmp_path) -> tuple[Model, Path]:
    """A trained-looking M3Net (calibration, card, metadata set) and its file."""
    model = Model.untrained("m3net")
    # Non-trivial batch-norm statistics, so a file that lost its buffers would show.
    for module in model.network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    model.temperature = 1.7
    model.threshold = 0.35
    model.name = "phantom-m3net"
    model.version = "1.2"
    model.card = "# Model card\nTrained on nothing."
    model.metadata = {"folds": 5, "auc": 0.5}
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    return model, path


def test_saved_model_reads_back_with_identical_outputs(saved) -> None:
    model, path = saved
    model.network.eval()
    crops = crops_batch(model)

    loaded = read_model_file(path)

    assert not loaded.network.training
    with torch.inference_mode():
        expected = model.network(crops)
        actual = loaded.network(crops)
    torch.testing.assert_close(actual.logit, expected.logit, rtol=0, atol=0)
    torch.testing.assert_close(actual.scale_attention, expected.scale_attention, rtol=0, atol=0)
    assert loaded.architecture == "m3net"
    assert loaded.preprocessing == model.preprocessing
    assert (loaded.temperature, loaded.threshold) == (1.7, 0.35)
    assert (loaded.name, loaded.version, loaded.card) == ("phantom-m3net", "1.2", model.card)
    assert loaded.metadata == {"folds": 5, "auc": 0.5}


def test_save_model_returns_the_file_sha256(saved, tmp_path) -> None:
    model, _ = saved
    path = tmp_path / "again.safetensors"
    digest = save_model(model, path)
    assert digest == file_sha256(path)
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_load_model_reads_a_path(saved) -> None:
    model, path = saved
    assert load_model(path).name == model.name
    assert load_model(str(path)).version == model.version


def test_saving_leaves_no_temporary_files(saved) -> None:
    _, path = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]


def tensor_data_offset(data: bytes) -> int:
    """Where the tensor bytes start in a safetensors file: after the 8-byte length and the header."""
    return 8 + int.from_bytes(data[:8], "little")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def with_flipped_weight_bytes(data: bytes) -> bytes:
    corrupt = bytearray(data)
    start = tensor_data_offset(data) + (len(data) - tensor_data_offset(data)) // 2
    for i in range(start, start + 64):
        corrupt[i] ^= 0xFF
    return bytes(corrupt)


def random_bytes(_data: bytes) -> bytes:
    return np.random.default_rng(0).bytes(4096)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncated, "not a readable model file"),
        (with_flipped_weight_bytes, "do not match their recorded checksum"),
        (random_bytes, "not a readable model file"),
        (lambda _data: b"", "not a readable model file"),
    ],
    ids=["truncated", "flipped-weight-bytes", "random-bytes", "empty"],
)
def test_damaged_model_file_is_a_model_file_error(saved, tmp_path, damage, message: str) -> None:
    _, good = saved
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damage(good.read_bytes()))

    with pytest.raises(ModelFileError, match=message) as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def rewrite_document(good, path, **changes) -> None:
    """Copy a model file with some entries of its JSON document replaced."""
    with safe_open(str(good), framework="pt") as handle:
        document = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    document.update(changes)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(document)})


def test_model_file_of_another_format_version_is_refused(saved, tmp_path) -> None:
    _, good = saved
    path = tmp_path / "future.safetensors"
    rewrite_document(good, path, format_version=999)

    with pytest.raises(ModelFileError, match="format version 999; this m3net-core reads version 1"):
        read_model_file(path)


def test_safetensors_file_that_is_not_a_model_is_refused(tmp_path) -> None:
    path = tmp_path / "embeddings.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="not an M3Net model file"):
        read_model_file(path)


def test_model_file_whose_config_does_not_fit_is_refused(saved, tmp_path) -> None:
    _, good = saved
    path = tmp_path / "odd-config.safetensors"
    rewrite_document(good, path, config={"no_such_field": 1})

    with pytest.raises(ModelFileError, match="does not fit"):
        read_model_file(path)


def test_saving_the_same_model_twice_gives_the_same_bytes(saved, tmp_path) -> None:
    model, good = saved
    again = tmp_path / "again.safetensors"
    assert save_model(model, again) == file_sha256(good)


def test_network_and_preprocessing_must_agree_on_the_views() -> None:
    import dataclasses

    from m3netcore.crops import default_preprocessing

    full = default_preprocessing()
    reordered = dataclasses.replace(full, scales=tuple(reversed(full.scales)))
    with pytest.raises(ValueError, match="must match in name and order"):
        Model(network=Model.untrained("m3net").network, architecture="m3net", preprocessing=reordered)


def test_unknown_model_name_is_a_model_file_error() -> None:
    with pytest.raises(ModelFileError, match="no-such-model"):
        load_model("no-such-model")


def test_folder_is_not_a_model_file(tmp_path) -> None:
    with pytest.raises(ModelFileError, match="not a file"):
        read_model_file(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threshold": 1.5}, "threshold"), ({"threshold": -0.1}, "threshold"), ({"temperature": 0.0}, "temperature")],
)
def test_model_rejects_bad_calibration(kwargs: dict, message: str) -> None:
    untrained = Model.untrained("single-micro")
    with pytest.raises(ValueError, match=message):
        Model(network=untrained.network, architecture="single-micro", preprocessing=untrained.preprocessing, **kwargs)


def test_a_file_from_before_the_per_scale_votes_loads_and_answers_the_same(tmp_path):
    """Old M3Net files hold ``classifier.*`` (one linear layer on the attention-weighted mix)."""
    from m3netcore import checkpoint

    torch.manual_seed(3)
    model = Model.untrained("m3net")
    new_path = tmp_path / "new.safetensors"
    save_model(model, new_path)
    with safe_open(str(new_path), framework="pt") as handle:
        document = json.loads(handle.metadata()[METADATA_KEY])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    old_state = {(key.replace("vote.", "classifier.", 1) if key.startswith("vote.") else key): value
                 for key, value in state.items()}  # fmt: skip
    document["weights_sha256"] = checkpoint._weights_digest(old_state)
    save_file(old_state, str(tmp_path / "old.safetensors"), metadata={METADATA_KEY: json.dumps(document)})

    old = read_model_file(tmp_path / "old.safetensors").network
    new = read_model_file(new_path).network
    views = [torch.rand(3, 1, 32, 32, 32) for _ in range(3)]
    with torch.inference_mode():
        assert torch.allclose(old(views).logit, new(views).logit)
        # and the old head's formula gives the current logit: W (sum a v) + b == sum a (W v + b)
        features = new.forward_features(views)
        tokens = torch.stack([new.tokenizers[n](features[:, i]) for i, n in enumerate(new.scale_names)], dim=1)
        tokens = tokens + new.scale_embedding
        output = new.forward_head(features)
        mixed = torch.einsum("bs,bst->bt", output.scale_attention, new.value(tokens))
        assert torch.allclose(new.vote(mixed).squeeze(-1), output.logit, atol=1e-6)


# --- a model is what it says it is ---------------------------------------------------------


def test_a_bundled_name_means_the_bundled_file_even_beside_a_file_of_that_name(tmp_path, monkeypatch) -> None:
    from m3netcore.checkpoint import bundled_registry

    impostor = Model.untrained("m3net")
    impostor.name, impostor.version, impostor.temperature = "m3net-demo", "0.2.0", 3.0
    save_model(impostor, tmp_path / "demo")
    monkeypatch.chdir(tmp_path)

    bundled = load_model("demo")
    local = load_model("./demo")

    # the checksummed bundled model, not the file in the working folder
    assert bundled.temperature == read_model_file(_bundled_path("demo")).temperature != 3.0
    assert file_sha256(_bundled_path("demo")) == bundled_registry()["demo"]["sha256"]
    assert local.temperature == 3.0  # a path is a path
    assert load_model(Path("demo")).temperature == 3.0


def _bundled_path(name: str) -> Path:
    from m3netcore.checkpoint import bundled_registry, resources

    return Path(str(resources.files("m3netcore") / "weights" / bundled_registry()[name]["file"]))


def rewrite_calibration_or_preprocessing(good: Path, path: Path, edit) -> None:
    """Copy a model file with ``edit(document)`` applied to its JSON document (kept as JSON text)."""
    with safe_open(str(good), framework="pt") as handle:
        document = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    edit(document)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(document)})


def _set(*keys, value):
    def edit(document: dict) -> None:
        target = document
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("calibration", "temperature", value=float("inf")), "temperature must be a finite"),
        (_set("calibration", "temperature", value="1.0"), "temperature must be a finite"),
        (_set("preprocessing", "scales", 0, "grid", value=[100_000, 32, 32]), "grid"),
        (_set("preprocessing", "scales", 2, "field_of_view_mm", value=[1e9, 96.0, 96.0]), "field_of_view_mm"),
        (_set("preprocessing", "outside_hu", value=float("nan")), "outside_hu must be a finite"),
        (_set("name", value="demo\x1b]0;owned\x07\x1b[2J"), "name holds the control character"),
        (_set("version", value="0.2.0\u202e"), "version holds the control character"),
        (_set("name", value="x" * 10_000), "name must be 1 to 200"),
        (_set("card", value="# card\x1b[31m red"), "card holds the control character"),
        (_set("metadata", value=["not", "a", "mapping"]), "metadata must be a mapping"),
    ],
    ids=[
        "temperature-inf",
        "temperature-text",
        "huge-grid",
        "huge-field-of-view",
        "outside-nan",
        "name-escape",
        "version-bidi",
        "name-long",
        "card-escape",
        "metadata-list",
    ],  # fmt: skip
)
def test_model_file_metadata_is_validated_before_use(saved, tmp_path, edit, message: str) -> None:
    _, good = saved
    path = tmp_path / "edited.safetensors"
    rewrite_calibration_or_preprocessing(good, path, edit)

    with pytest.raises(ModelFileError, match=message) as caught:
        load_model(path)
    text = str(caught.value)
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text  # one printable line


def _swap_architecture(document: dict) -> None:
    """m3net weights under another architecture's name and views."""
    single = Model.untrained("single-micro")
    document["architecture"] = "single-micro"
    document["config"] = {}
    document["preprocessing"] = single.preprocessing.to_dict()


def test_weights_of_another_architecture_are_one_line(saved, tmp_path, capsys) -> None:
    from m3netcore.cli import main

    _, good = saved
    path = tmp_path / "swapped.safetensors"
    rewrite_calibration_or_preprocessing(good, path, _swap_architecture)

    with pytest.raises(ModelFileError, match="not those of a single-micro network: .* missing") as caught:
        load_model(path)
    assert "\n" not in str(caught.value)
    assert main(["model-info", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3net: error: ") and err.count("\n") == 1


def test_a_tensor_of_another_shape_is_one_line(saved, tmp_path) -> None:
    from m3netcore import checkpoint

    _, good = saved
    with safe_open(str(good), framework="pt") as handle:
        document = json.loads(handle.metadata()[METADATA_KEY])
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    key = next(k for k, v in sorted(state.items()) if v.dim() == 5)  # a convolution kernel
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    document["weights_sha256"] = checkpoint._weights_digest(state)  # a consistent file, of the wrong shape
    path = tmp_path / "reshaped.safetensors"
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(document)})

    with pytest.raises(ModelFileError, match=f"1 tensor\\(s\\) of another shape \\(e.g. {key}") as caught:
        load_model(path)
    assert "\n" not in str(caught.value)


def test_an_unknown_architecture_is_named_in_one_line(saved, tmp_path) -> None:
    _, good = saved
    path = tmp_path / "unknown.safetensors"
    rewrite_calibration_or_preprocessing(good, path, _set("architecture", value="m3net-xl\x1b[2J"))
    with pytest.raises(ModelFileError, match="control character") as caught:
        load_model(path)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
