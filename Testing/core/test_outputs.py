"""OutputFolder: one run per folder (a real second process), result sets replaced whole, nothing foreign touched."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from m3netcore.outputs import (
    LOCK_NAME,
    MANIFEST_NAME,
    OutputConflict,
    OutputFolder,
    OutputFolderBusy,
    run_folder_lock,
    user_entries,
)

# A second process that takes the folder, stages a file, says so, and holds on until its stdin closes.
HOLDER = """
import sys
from m3netcore.outputs import OutputFolder
with OutputFolder(sys.argv[1]) as staging:
    (staging / "from-holder.txt").write_text("holder")
    print("held", flush=True)
    sys.stdin.readline()
"""


@contextlib.contextmanager
def held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """A real process holding ``folder`` with an OutputFolder; closing its stdin lets it commit."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        if process.poll() is None:
            process.stdin.close()
            process.wait(timeout=60)
        process.stdout.close()


def write_set(folder: Path, files: dict[str, str]) -> list[str]:
    with OutputFolder(folder) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
    return sorted(files)


def visible(folder: Path) -> dict[str, str]:
    files = (p.relative_to(folder) for p in sorted(folder.rglob("*")) if p.is_file())
    return {f.as_posix(): (folder / f).read_text() for f in files if not f.parts[0].startswith(".m3net")}


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path) -> None:
    out = tmp_path / "out"
    with held_by_another_process(out) as holder:
        with pytest.raises(OutputFolderBusy, match=rf"{out} is in use by another m3net run \(process {holder.pid} "):
            with OutputFolder(out):
                pytest.fail("entered a folder another process holds")
        with pytest.raises(OutputFolderBusy):
            with run_folder_lock(out):
                pass
        assert visible(out) == {}  # the holder's file is staged, not yet in the folder
    assert visible(out) == {"from-holder.txt": "holder"}
    assert not (out / LOCK_NAME).exists()
    write_set(out, {"mine.txt": "mine"})  # free again once the holder ended


def test_a_killed_run_frees_the_folder_and_its_staging_is_cleared(tmp_path) -> None:
    out = tmp_path / "out"
    write_set(out, {"results.json": "earlier"})
    with held_by_another_process(out) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    assert [p.name for p in out.glob(".m3net-staging-*")]  # left by the killed run

    write_set(out, {"results.json": "new"})

    assert visible(out) == {"results.json": "new"}
    assert not list(out.glob(".m3net-staging-*"))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "results.json"]


def test_a_rerun_replaces_the_earlier_set_and_keeps_the_users_files(tmp_path) -> None:
    out = tmp_path / "out"
    write_set(out, {"results.json": "3 nodules", "01_a.nrrd": "a", "02_b.nrrd": "b", "scene/scene.mrml": "s",
                    "scene/01.nrrd": "s1"})  # fmt: skip
    (out / "notes.txt").write_text("the user's")
    (out / "scene" / "mine.mrml").write_text("the user's too")

    write_set(out, {"results.json": "1 nodule", "01_a.nrrd": "a2"})

    assert visible(out) == {"results.json": "1 nodule", "01_a.nrrd": "a2", "notes.txt": "the user's",
                            "scene/mine.mrml": "the user's too"}  # fmt: skip
    write_set(out, {"results.json": "again"})
    (out / "scene" / "mine.mrml").unlink()
    write_set(out, {"results.json": "once more"})
    assert (out / "scene").is_dir()  # a folder m3net did not write in its last run is not m3net's to remove


def test_the_folders_of_an_earlier_set_go_with_it(tmp_path) -> None:
    out = tmp_path / "out"
    write_set(out, {"results.json": "x", "scene/deep/1.nrrd": "s"})
    write_set(out, {"results.json": "y"})
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "results.json"]


def test_a_failed_run_leaves_the_earlier_set_as_it_was(tmp_path) -> None:
    out = tmp_path / "out"
    write_set(out, {"results.json": "earlier", "01_a.nrrd": "a"})
    before = sorted(p.name for p in out.iterdir())

    with pytest.raises(RuntimeError, match="nodule 2"):
        with OutputFolder(out) as staging:
            (staging / "01_a.nrrd").write_text("new a")
            (staging / "01_c.nrrd").write_text("new c")
            raise RuntimeError("failed on nodule 2")

    assert visible(out) == {"results.json": "earlier", "01_a.nrrd": "a"}
    assert sorted(p.name for p in out.iterdir()) == before  # no staging, no lock


def test_a_new_folder_is_not_left_behind_by_a_failed_run(tmp_path) -> None:
    out = tmp_path / "a" / "out"
    with pytest.raises(KeyboardInterrupt):
        with OutputFolder(out) as staging:
            (staging / "results.json").write_text("half")
            raise KeyboardInterrupt
    assert not out.exists()


def test_a_file_no_m3net_run_wrote_stops_the_commit_before_anything_moves(tmp_path) -> None:
    out = tmp_path / "out"
    write_set(out, {"01_a.nrrd": "a"})
    (out / "results.json").write_text("the user's own results.json")

    with pytest.raises(OutputConflict, match=r"results.json exists and was not written by an earlier m3net run"):
        write_set(out, {"01_a.nrrd": "new a", "02_b.nrrd": "b", "results.json": "new"})

    assert visible(out) == {"01_a.nrrd": "a", "results.json": "the user's own results.json"}
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "01_a.nrrd", "results.json"]


def test_errors_about_staged_files_name_the_final_path(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as caught:
        with OutputFolder(out) as staging:
            (staging / "missing" / "x.nrrd").read_bytes()
    assert caught.value.filename == str(out / "missing" / "x.nrrd")
    assert ".m3net" not in str(caught.value)


def test_staged_files_and_folders_get_the_permissions_the_umask_gives(tmp_path) -> None:
    previous = os.umask(0o027)
    try:
        write_set(tmp_path / "out", {"results.json": "x", "scene/scene.mrml": "s"})
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE((out / "results.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "scene").stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_user_entries_ignore_the_lock_and_the_record(tmp_path) -> None:
    with run_folder_lock(tmp_path / "run") as run:
        assert (run / LOCK_NAME).is_file()
        assert user_entries(run) == []
    assert not (tmp_path / "run").exists()  # made for the run, left empty: removed
