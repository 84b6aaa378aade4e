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
