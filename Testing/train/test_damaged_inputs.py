"""Damaged caches, settings and run folders, and data changed under a run: one error line, exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m3netcore.cli import main
from m3netcore.train.config import RunConfig
from m3netcore.train.run import train_run

from .conftest import write_tiny_cache

TWO_EPOCHS = RunConfig(epochs=2, batch_size=8, log_every=100)


def _copy_cache(source: Path, target: Path) -> Path:
    """The cache's small files copied (to damage), its cube files linked (never written)."""
    target.mkdir()
    for file in source.iterdir():
        if file.suffix == ".npy":
            (target / file.name).symlink_to(file)
        else:
            shutil.copy(file, target / file.name)
    return target


def _damage_info(path: Path, change) -> None:
    info = json.loads((path / "cache.json").read_text())
    (path / "cache.json").write_text(json.dumps(change(info)))


def _damage_manifest(path: Path, change) -> None:
    text = (path / "manifest.csv").read_text()
    (path / "manifest.csv").write_text(change(text))


def _relabel_first(text: str) -> str:
    header, first, *rest = text.splitlines()
    column = header.split(",").index("label_mean-excl3")
    cells = first.split(",")
    cells[column] = "maybe"
    return "\n".join([header, ",".join(cells), *rest]) + "\n"


DAMAGES = {
    "cache.json not a mapping": (
        lambda p: _damage_info(p, lambda info: [1, 2]),
        "cache.json is corrupt: not a mapping",
    ),
    "pyramid entry without grid": (
        lambda p: _damage_info(p, lambda info: info | {"pyramid": [{k: v for k, v in e.items() if k != "grid"}
                                                                   for e in info["pyramid"]]}),  # fmt: skip
        "a pyramid entry without name, grid or field of view",
    ),
    "a label that is not 0 or 1": (
        lambda p: _damage_manifest(p, _relabel_first),
        "manifest.csv line 2: label_mean-excl3 is 'maybe', not 0, 1 or empty",
    ),
    "manifest cut off mid-row": (
        lambda p: _damage_manifest(p, lambda text: text[: text.rindex("\n", 0, len(text) - 1) + 20]),
        "(a cut-off or damaged file?)",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_is_named_in_one_line(damage, tiny_cache, tmp_path, capsys):
    broken = _copy_cache(tiny_cache, tmp_path / "broken")
    change, message = DAMAGES[damage]
    change(broken)
    assert main(["train", "--data", str(broken), "--fold", "0", "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("m3net: error:") and message in error, error


def test_settings_files_that_are_not_json_or_toml_are_named(tiny_cache, tmp_path, capsys):
    binary = tmp_path / "c.json"
    binary.write_bytes(b"\xff\xfe{")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("epochs: 2\n")
    base = ["train", "--data", str(tiny_cache), "--fold", "0", "--out", str(tmp_path / "run"), "--config"]
    assert main([*base, str(binary)]) == 2
    assert "c.json is not UTF-8 text" in capsys.readouterr().err
    assert main([*base, str(yaml)]) == 2
    assert "config files are JSON or TOML (.toml), not YAML" in capsys.readouterr().err
    plain = tmp_path / "settings"  # no suffix: JSON, as before
    plain.write_text("{not json")
    assert main([*base, str(plain)]) == 2
    assert "settings is not valid JSON" in capsys.readouterr().err


@pytest.fixture
def stopped_run(tmp_path) -> tuple[Path, Path]:
    """A 40-nodule cache and a run on it stopped after its first epoch."""
    cache = write_tiny_cache(tmp_path / "cache", 40, seed=1, folds=2)
    run = tmp_path / "run"
    train_run(cache, "m3net", 0, run, TWO_EPOCHS, stop_after_epoch=1, device="cpu", log=lambda _: None)
    return cache, run


def test_resume_refuses_a_cache_rebuilt_in_place_with_other_nodules(stopped_run, capsys):
    cache, run = stopped_run
    shutil.rmtree(cache)
    write_tiny_cache(cache, 48, seed=1, folds=2)  # same path, more nodules: the split would not be the run's
    assert main(["train", "--data", str(cache), "--fold", "0", "--out", str(run), "--resume"]) == 2
    error = capsys.readouterr().err
    assert f"is another run: its cache {cache} has changed since" in error


@pytest.mark.parametrize("name", ["config.json", "split.json"])
def test_resume_names_a_damaged_run_file(name, stopped_run, capsys):
    cache, run = stopped_run
    (run / name).write_text((run / name).read_text()[:20])  # cut off
    assert main(["train", "--data", str(cache), "--fold", "0", "--out", str(run), "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{name} is missing or damaged" in error


def test_resume_names_a_run_identity_that_is_emptied(stopped_run, capsys):
    cache, run = stopped_run
    (run / "split.json").write_text("{}")
    assert main(["train", "--data", str(cache), "--fold", "0", "--out", str(run), "--resume"]) == 2
    assert "split.json is damaged: it names no fold, architecture, data" in capsys.readouterr().err


def test_resume_from_a_garbage_checkpoint_is_one_line(stopped_run, capsys):
    cache, run = stopped_run
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint" * 100)
    assert main(["train", "--data", str(cache), "--fold", "0", "--out", str(run), "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not a readable training checkpoint" in error


def test_evaluate_of_a_path_that_does_not_exist_says_so(tiny_cache, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothere"), "--data", str(tiny_cache)]) == 2
    assert f"no run folder, model file or bundled model {tmp_path / 'nothere'}" in capsys.readouterr().err


def test_a_protocol_the_cache_has_no_labels_for_is_named(tiny_cache, tmp_path, capsys):
    argv = ["train", "--data", str(tiny_cache), "--fold", "0", "--out", str(tmp_path / "r"), "--protocol",
            "official-min3"]  # fmt: skip
    assert main(argv) == 2
    assert "has no official-min3 labels (column label_official-min3)" in capsys.readouterr().err


def test_outputs_blocked_by_a_folder_or_a_file_are_named_before_any_work(two_fold_cache, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    base = ["benchmark", "accuracy", "--data", str(two_fold_cache), "--protocol", "mean-excl3", "--rows",
            "majority class", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main([*base, "--json", str(tmp_path / "folder")]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    assert main([*base, "--json", str(tmp_path / "afile" / "rows.json")]) == 2
    assert f"{tmp_path / 'afile'} exists and is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before the benchmark began
