"""Output files: unique names, atomic writes, packaging of the bundled model."""

from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib

import m3netcore
from m3netcore.atomic import atomic_path, write_text_atomic
from m3netcore.checkpoint import read_registry
from m3netcore.errors import ModelFileError
from m3netcore.points import unique_labels as _unique
from m3netcore.results import heatmap_filename


def test_heatmap_names_stay_unique_when_labels_clean_to_the_same_text():
    labels = ["N 1", "N_1", "N/1", "?", "!"]
    names = [heatmap_filename(n, label, "micro") for n, label in enumerate(labels, start=1)]
    assert len(set(names)) == len(names)
    assert names[0] == "01_N_1_heatmap_micro.nrrd"
    assert names[3] == "04_nodule_heatmap_micro.nrrd"


def test_repeated_point_labels_get_free_suffixes():
    assert _unique(["a", "a", "a-2", "b"]) == ["a", "a-2", "a-2-2", "b"]
    assert len(set(_unique(["x"] * 5))) == 5


def test_atomic_write_keeps_double_suffixes_and_leaves_nothing_on_failure(tmp_path):
    seen = []
    with atomic_path(tmp_path / "heat.nii.gz") as temporary:
        seen.append(temporary.name)
        temporary.write_bytes(b"data")
    assert seen[0].endswith(".nii.gz") and seen[0].startswith(".heat.")
    assert (tmp_path / "heat.nii.gz").read_bytes() == b"data"
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "other.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.nii.gz"]


def test_atomic_write_honours_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "results.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o640


def test_corrupt_or_incomplete_registry_is_a_model_file_error(tmp_path):
    broken = tmp_path / "registry.json"
    broken.write_text("{not json")
    with pytest.raises(ModelFileError, match="registry .* is corrupt"):
        read_registry(broken)
    broken.write_text('{"demo": {"file": "x.safetensors"}}')
    with pytest.raises(ModelFileError, match="without file and sha256"):
        read_registry(broken)
    assert read_registry(tmp_path / "absent.json") == {}


def test_every_bundled_weights_file_is_declared_as_package_data():
    """An installed (non-editable) package must carry the weights and their registry."""
    package = Path(m3netcore.__file__).parent
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["m3netcore"]
    shipped = [p.relative_to(package).as_posix() for p in (package / "weights").iterdir()]
    assert "weights/registry.json" in shipped
    for name in shipped:
        assert any(fnmatch(name, pattern) for pattern in patterns), name


def test_streamed_results_json_is_the_document_json_dumps_would_write(tmp_path, small_ct, phantom):
    import json

    import torch

    from m3netcore.results import write_results

    torch.manual_seed(0)
    results = m3netcore.predict(m3netcore.build_model("m3net"), small_ct, [phantom.NODULE_LPS] * 2, device="cpu",
                                explain=False)  # fmt: skip
    source = {"image": "ct.nrrd", "note": ["a", 1]}

    document = write_results(results, ["a", "b"], tmp_path / "two", source=source)
    write_results([], [], tmp_path / "none", source=source)

    assert (tmp_path / "two" / "results.json").read_text() == json.dumps(document, indent=2) + "\n"
    assert json.loads((tmp_path / "none" / "results.json").read_text())["nodules"] == []
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["results.csv", "results.json"]  # nothing partial


def test_heatmap_file_names_stay_short_whatever_the_label():
    name = heatmap_filename(7, "x" * 1000, "combined")
    assert name == f"07_{'x' * 60}_heatmap_combined.nrrd"
