"""``m3net predict-many`` on a real two-process ``distributed.LocalCluster`` and in real processes.

The CTs are tiny (48^3 voxels at 1.5 mm) with one to three nodules, so that a CT takes
well under a second; the cluster is started once for the module.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m3netcore.batch import CT_FOLDER, DONE_RECORD, ct_folder_name
from m3netcore.cli import EXIT_BAD_INPUT, main

distributed = pytest.importorskip("distributed")

M3NET = Path(sys.executable).with_name("m3net")
SIZE = 48
SPACING_MM = 1.5
ORIGIN_MM = -(SIZE - 1) / 2 * SPACING_MM
HEATMAP_SCALES = ("micro", "meso", "macro", "combined")


@pytest.fixture(scope="module")
def scheduler() -> str:
    """The address of a LocalCluster of two worker processes of two threads (one reads ahead), on loopback only."""
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=2, host="127.0.0.1",
                                  dashboard_address=None) as cluster:  # fmt: skip
        yield cluster.scheduler_address


def chest(seed: int, nodules: int) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """A small HU volume ``[z, y, x]``: air, a soft-tissue body, noisy lung and ``nodules`` solid balls."""
    rng = np.random.default_rng(seed)
    axis = ORIGIN_MM + SPACING_MM * np.arange(SIZE)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    volume = np.where(x**2 + y**2 < 33.0**2, 40.0, -1000.0)
    volume = np.where(x**2 + y**2 + (z / 1.3) ** 2 < 28.0**2, -850.0 + rng.normal(0, 20, volume.shape), volume)
    centres = []
    for _ in range(nodules):
        centre = tuple(float(v) for v in rng.uniform(-12.0, 12.0, 3))
        radius = rng.uniform(3.0, 6.0)
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < radius**2
        volume = np.where(inside, 30.0 + rng.normal(0, 20, volume.shape), volume)
        centres.append(centre)
    return np.round(volume).astype(np.int16), centres


def write_nrrd_ct(folder: Path, name: str, seed: int, nodules: int) -> tuple[str, str]:
    """``name.nrrd`` and ``name.csv`` (x,y,z in LPS) in ``folder``; returns their names."""
    volume, centres = chest(seed, nodules)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((SPACING_MM,) * 3)
    image.SetOrigin((ORIGIN_MM,) * 3)
    sitk.WriteImage(image, str(folder / f"{name}.nrrd"), useCompression=True)
    rows = "".join(f"{x:.3f},{y:.3f},{z:.3f}\n" for x, y, z in centres)
    (folder / f"{name}.csv").write_text("x,y,z\n" + rows)
    return f"{name}.nrrd", f"{name}.csv"


def write_dicom_ct(folder: Path, name: str, seed: int, nodules: int, series_uid: str) -> list[tuple[float, ...]]:
    """A DICOM series in ``folder/name``; returns the nodule centres."""
    from ct_dicom import write_ct_slice

    volume, centres = chest(seed, nodules)
    series = folder / name
    series.mkdir()
    for k, plane in enumerate(volume):
        write_ct_slice(series / f"{k:03d}.dcm", plane, position=(ORIGIN_MM, ORIGIN_MM, ORIGIN_MM + k * SPACING_MM),
                       orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(SPACING_MM, SPACING_MM),
                       slice_thickness=SPACING_MM, patient_id="BATCH-1", study_uid=series_uid + ".1",
                       series_uid=series_uid, instance=k + 1)  # fmt: skip
    return centres


def write_manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    path = folder / "manifest.csv"
    path.write_text("image,points\n" + "".join(f"{image},{points}\n" for image, points in rows))
    return path


def predict_many(manifest: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    argv = [str(M3NET), "predict-many", str(manifest), "--out", str(out), "--device", "cpu", *options]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def folder_files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` -> its modification time (ns)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, scheduler):
    """Three CTs (two NRRD, one DICOM whose points are in a LUNA16 file of two series) through predict-many."""
    data = tmp_path_factory.mktemp("batch-data")
    rows = [write_nrrd_ct(data, "ct-a", 1, 1), write_nrrd_ct(data, "ct-b", 2, 3)]
    uid = "1.2.826.0.1.3680043.8.498.4242"
    centres = write_dicom_ct(data, "ct-c", 3, 2, uid)
    luna = "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(f"{uid},{x},{y},{z},6\n" for x, y, z in centres)
    (data / "annotations.csv").write_text(luna + "1.2.3.999,0,0,0,5\n")
    rows.append(("ct-c", "annotations.csv"))
    manifest = write_manifest(data, rows)
    out = tmp_path_factory.mktemp("batch-out") / "run"
    completed = predict_many(manifest, out, "--scheduler", scheduler)
    return {"data": data, "manifest": manifest, "rows": rows, "out": out, "completed": completed}


def test_results_equal_m3net_predict_for_every_ct(first_run, tmp_path, capsys) -> None:
    completed, out = first_run["completed"], first_run["out"]
    assert completed.returncode == 0, completed.stderr
    assert "3 done, 0 finished before, 0 failed; 6 nodules" in completed.stdout
    combined = read_csv(out / "results.csv")
    assert len(combined) == 6
    for image, points in first_run["rows"]:
        reference = tmp_path / image
        code = main(["predict", str(first_run["data"] / image), "--points", str(first_run["data"] / points),
                     "--device", "cpu", "--out", str(reference)])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        folder = out / CT_FOLDER / ct_folder_name(image, None)
        ours, theirs = (json.loads((f / "results.json").read_text()) for f in (folder, reference))
        assert len(ours["nodules"]) == len(theirs["nodules"]) > 0
        for mine, reference_nodule in zip(ours["nodules"], theirs["nodules"], strict=True):
            numbers = ("probability", "logit", "scale_attention", "model")  # a worker has one torch thread: last bits
            assert {k: v for k, v in mine.items() if k not in numbers} == {
                k: v for k, v in reference_nodule.items() if k not in numbers
            }
            assert mine["probability"] == pytest.approx(reference_nodule["probability"], abs=1e-6)
            assert mine["scale_attention"] == pytest.approx(reference_nodule["scale_attention"], abs=1e-6)
        assert ours["provenance"]["input"] | {"path": None} == theirs["provenance"]["input"] | {"path": None}
        assert ours["provenance"]["model"] == theirs["provenance"]["model"]
        for nodule in ours["nodules"]:
            for scale in HEATMAP_SCALES:
                name = nodule["heatmap_files"][scale]
                mine, theirs_map = (sitk.ReadImage(str(f / name)) for f in (folder, reference))
                assert np.allclose(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(theirs_map), atol=1e-5)
                assert mine.GetOrigin() == theirs_map.GetOrigin()
        rows = [row for row in combined if row["ct"] == folder.name]
        expected = read_csv(reference / "results.csv")
        assert [row["image"] for row in rows] == [image] * len(expected)
        varying = {"time", "ct", "image", "series_uid", "probability", *(f"attention_{s}" for s in HEATMAP_SCALES)}
        assert [{k: v for k, v in r.items() if k not in varying} for r in rows] == [
            {k: v for k, v in r.items() if k not in varying} for r in expected
        ]
        for row, reference_row in zip(rows, expected, strict=True):
            assert float(row["probability"]) == pytest.approx(float(reference_row["probability"]), abs=2e-4)
    assert read_csv(out / "failures.csv") == []


def test_each_worker_loads_the_model_once(first_run, scheduler) -> None:
    def models_loaded() -> int:
        from m3netcore import batch

        return len(batch._MODELS)

    with distributed.Client(scheduler) as client:
        loaded = client.run(models_loaded)
    assert sorted(loaded.values())[-1] == 1  # a worker that ran CTs kept exactly one model
    assert all(count <= 1 for count in loaded.values())


def test_a_rerun_skips_every_finished_ct_and_redoes_a_changed_one(first_run, scheduler) -> None:
    out, data = first_run["out"], first_run["data"]
    before = folder_files(out / CT_FOLDER)
    first_rows = sorted(map(tuple, (r.values() for r in read_csv(out / "results.csv"))))

    again = predict_many(first_run["manifest"], out, "--scheduler", scheduler)

    assert again.returncode == 0, again.stderr
    assert "0 done, 3 finished before, 0 failed; 6 nodules" in again.stdout
    assert folder_files(out / CT_FOLDER) == before  # nothing was written again
    assert sorted(map(tuple, (r.values() for r in read_csv(out / "results.csv")))) == first_rows

    points = data / "ct-a.csv"  # same file, new content: a new checksum, so this CT runs again
    points.write_text(points.read_text() + "0.0,0.0,0.0\n")
    changed = predict_many(first_run["manifest"], out, "--scheduler", scheduler)
    assert changed.returncode == 0, changed.stderr
    assert "1 done, 2 finished before, 0 failed; 7 nodules" in changed.stdout
    assert len(read_csv(out / CT_FOLDER / ct_folder_name("ct-a.nrrd", None) / "results.csv")) == 2


def test_a_worker_killed_mid_ct_costs_only_that_cts_retry(tmp_path, scheduler) -> None:
    nodules = {f"k-{n}": 3 for n in range(6)}
    rows = [write_nrrd_ct(tmp_path, name, 10 + n, count) for n, (name, count) in enumerate(nodules.items())]
    manifest, out = write_manifest(tmp_path, rows), tmp_path / "out"
    argv = [str(M3NET), "predict-many", str(manifest), "--out", str(out), "--device", "cpu", "--scheduler", scheduler]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, killed_folder = None, None
    deadline = time.monotonic() + 120
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        for lock in (out / CT_FOLDER).glob("*/.m3net.lock"):  # held by the worker writing that CT
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if pid != process.pid and not (lock.parent / DONE_RECORD).exists():
                os.kill(pid, signal.SIGKILL)
                killed, killed_folder = pid, lock.parent
                break
        time.sleep(0.005)
    stdout, stderr = process.communicate(timeout=180)

    assert killed is not None, "no worker was seen writing a CT"
    assert process.returncode == 0, stderr
    assert "6 done, 0 finished before, 0 failed; 18 nodules" in stdout
    combined = read_csv(out / "results.csv")
    keys = [(row["ct"], row["label"]) for row in combined]
    assert len(keys) == 18 and len(set(keys)) == 18  # nothing lost, nothing twice
    assert {row["ct"] for row in combined} == {ct_folder_name(image, None) for image, _ in rows}
    for image, _ in rows:
        folder = out / CT_FOLDER / ct_folder_name(image, None)
        assert len(json.loads((folder / "results.json").read_text())["nodules"]) == 3
        assert (folder / DONE_RECORD).is_file()
        assert not list(folder.glob(".m3net-staging-*"))
    assert len(list(killed_folder.glob("*_heatmap_*.nrrd"))) == 12


def test_ctrl_c_leaves_finished_cts_whole_and_the_next_run_goes_on(tmp_path, scheduler) -> None:
    rows = [write_nrrd_ct(tmp_path, f"i-{n}", 20 + n, 2) for n in range(4)]
    manifest, out = write_manifest(tmp_path, rows), tmp_path / "out"
    argv = [str(M3NET), "predict-many", str(manifest), "--out", str(out), "--device", "cpu", "--scheduler", scheduler]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / CT_FOLDER).glob(f"*/{DONE_RECORD}")) and process.poll() is None:
        assert time.monotonic() < deadline, "no CT finished"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert stderr.strip().endswith("m3net: interrupted")
    for row in read_csv(out / "results.csv"):  # only whole CTs are in the table
        assert (out / CT_FOLDER / row["ct"] / DONE_RECORD).is_file()

    again = predict_many(manifest, out, "--scheduler", scheduler)  # a task of the first run may still be writing

    assert again.returncode == 0, again.stderr
    assert ", 0 failed; 8 nodules" in again.stdout and "0 finished before" not in again.stdout
    keys = [(row["ct"], row["label"]) for row in read_csv(out / "results.csv")]
    assert len(keys) == 8 and len(set(keys)) == 8


def test_a_corrupt_ct_is_recorded_and_the_others_finish_on_local_workers(tmp_path) -> None:
    good = write_nrrd_ct(tmp_path, "good", 5, 1)
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 48 48 48\n\n" + b"\0" * 99)
    (tmp_path / "broken.csv").write_text("x,y,z\n0,0,0\n")
    manifest = write_manifest(tmp_path, [("broken.nrrd", "broken.csv"), good])
    out = tmp_path / "out"

    completed = predict_many(manifest, out, "--workers", "1")

    assert completed.returncode == 1, completed.stderr
    assert "1 done, 0 finished before, 1 failed; 1 nodules" in completed.stdout
    assert f"m3net: 1 CTs failed: see {out}/failures.csv" in completed.stderr
    (failure,) = read_csv(out / "failures.csv")
    assert failure["image"] == "broken.nrrd"
    assert failure["error"].startswith("cannot read ") and "\n" not in failure["error"]
    assert len(read_csv(out / "results.csv")) == 1
    assert not (out / CT_FOLDER / ct_folder_name("broken.nrrd", None)).exists()


def bad_manifests(folder: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a piece of the error line)."""
    ct = write_nrrd_ct(folder, "one", 1, 1)
    (folder / "no-points.csv").write_text("image,series_uid\none.nrrd,\n")
    (folder / "header-only.csv").write_text("image,points\n")
    (folder / "twice.csv").write_text(f"image,points\n{ct[0]},{ct[1]}\n{ct[0]},{ct[1]}\n")
    (folder / "empty-cell.csv").write_text(f"image,points\n{ct[0]},\n")
    (folder / "url.csv").write_text(f"image,points\nhttps://pacs.example.org/wado,{ct[1]}\n")
    (folder / "url-series.csv").write_text(
        f"image,points,series_uid\nhttps://pacs.example.org/dicom-web/studies/1.2/series/1.2.3,{ct[1]},1.2.4\n"
    )
    good = write_manifest(folder, [ct])
    out = str(folder / "out")
    return {
        "missing file": (["predict-many", str(folder / "nope.csv"), "--out", out], "no such manifest file"),
        "no points column": (["predict-many", str(folder / "no-points.csv"), "--out", out], "no column points"),
        "no rows": (["predict-many", str(folder / "header-only.csv"), "--out", out], "has no rows"),
        "a CT twice": (["predict-many", str(folder / "twice.csv"), "--out", out], "line 3: the same CT as line 2"),
        "empty cell": (["predict-many", str(folder / "empty-cell.csv"), "--out", out], "line 2: empty points"),
        "no workers": (["predict-many", str(good), "--out", out, "--workers", "0"], "--workers must be at least 1"),
        "read-ahead": (["predict-many", str(good), "--out", out, "--read-ahead", "-1"], "--read-ahead must be"),
        "not a study URL": (["predict-many", str(folder / "url.csv"), "--out", out],
                            "line 2: https://pacs.example.org/wado is not a DICOMweb study"),
        "two series": (["predict-many", str(folder / "url-series.csv"), "--out", out],
                       "the URL names series 1.2.3 but series_uid is 1.2.4"),
        "bad model": (["predict-many", str(good), "--out", out, "--model", str(folder / "x.safetensors")],
                      "no model file"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["missing file", "no points column", "no rows", "a CT twice", "empty cell", "no workers", "read-ahead",
     "not a study URL", "two series", "bad model"],  # fmt: skip
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case) -> None:
    argv, expected = bad_manifests(tmp_path)[case]

    code = main(argv)

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.count("\n") == 1 and err.startswith("m3net: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_an_unreachable_scheduler_leaves_the_last_runs_tables(first_run, monkeypatch, capsys) -> None:
    from m3netcore import batch

    out = first_run["out"]
    tables = {name: (out / name).read_text() for name in ("results.csv", "failures.csv")}
    monkeypatch.setattr(batch, "SCHEDULER_TIMEOUT", "2s")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{closed.getsockname()[1]}"

    code = main(["predict-many", str(first_run["manifest"]), "--out", str(out), "--device", "cpu",
                 "--scheduler", address])  # fmt: skip

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and f"cannot reach the Dask scheduler at {address}" in err
    assert {name: (out / name).read_text() for name in tables} == tables
    assert len(read_csv(out / "results.csv")) >= 6


def test_the_checksum_of_a_detached_header_covers_the_data_file_it_names_only(tmp_path) -> None:
    from m3netcore.batch import ManifestRow, input_sha256

    volume, _ = chest(7, 1)
    image = sitk.GetImageFromArray(volume)
    sitk.WriteImage(image, str(tmp_path / "scan.mhd"))  # scan.mhd naming scan.raw
    (tmp_path / "scan.csv").write_text("x,y,z\n0,0,0\n")
    row = ManifestRow(name="scan", image_text="scan.mhd", image=tmp_path / "scan.mhd", points=tmp_path / "scan.csv",
                      series_uid=None)  # fmt: skip
    first = input_sha256(row)
    (tmp_path / "scan.notes").write_text("a file beside it that the header does not name")
    assert input_sha256(row) == first
    data = bytearray((tmp_path / "scan.raw").read_bytes())
    data[0] ^= 1
    (tmp_path / "scan.raw").write_bytes(bytes(data))
    assert input_sha256(row) != first


def test_each_ct_is_told_its_own_warnings_when_two_are_read_at_once(tmp_path) -> None:
    rows = []
    for n in range(4):  # odd CTs are not in HU (0..1, as after normalisation), even ones are
        volume, centres = chest(30 + n, 1)
        if n % 2:
            volume = volume.astype(np.float32) / 4000.0 + 0.25
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((SPACING_MM,) * 3)
        image.SetOrigin((ORIGIN_MM,) * 3)
        sitk.WriteImage(image, str(tmp_path / f"w-{n}.nrrd"))
        (tmp_path / f"w-{n}.csv").write_text("x,y,z\n" + "".join(f"{x},{y},{z}\n" for x, y, z in centres))
        rows.append((f"w-{n}.nrrd", f"w-{n}.csv"))

    completed = predict_many(write_manifest(tmp_path, rows), tmp_path / "out", "--workers", "1", "--read-ahead", "1")

    assert completed.returncode == 0, completed.stderr
    told = [line for line in completed.stderr.splitlines() if "Hounsfield" in line]
    assert sorted(line.split(": ")[2].rsplit("/", 1)[-1] for line in told) == ["w-1.nrrd", "w-3.nrrd"], told
