"""The batch script under plain Python (the slicer-core wheel), as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from M3NetSlicerLib.headless import HeadlessApplication
from mrml_helpers import MODULE_DIR, heat_pixels

SCRIPT = MODULE_DIR / "Scripts" / "m3net_batch.py"
M3NET = Path(sys.executable).with_name("m3net")


def batch(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def inputs(small_chest, tmp_path_factory):
    image, nodules = small_chest
    folder = tmp_path_factory.mktemp("batch-inputs")
    sitk.WriteImage(image, str(folder / "ct.nrrd"), useCompression=True)
    markups = {
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "controlPoints": [
                    {"label": label, "position": list(lps), "positionStatus": "defined"} for label, lps in nodules
                ],
            }
        ]
    }
    (folder / "nodules.mrk.json").write_text(json.dumps(markups))
    with open(folder / "nodules_ras.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "x", "y", "z"])
        for label, (x, y, z) in nodules:
            writer.writerow([label, -x, -y, z])
    return folder


@pytest.fixture(scope="module")
def batch_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch-out")
    done = batch("--volume", inputs / "ct.nrrd", "--points", inputs / "nodules.mrk.json", "--out", out, "--per-scale")
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done


def test_batch_writes_what_m3net_predict_writes(batch_run, inputs, tmp_path):
    out, done = batch_run
    reference = tmp_path / "predict"
    cli = subprocess.run(
        [
            str(M3NET),
            "predict",
            str(inputs / "ct.nrrd"),
            "--points",
            str(inputs / "nodules.mrk.json"),
            "--out",
            str(reference),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    ours = json.loads((out / "results.json").read_text())
    theirs = json.loads((reference / "results.json").read_text())
    assert len(ours["nodules"]) == len(theirs["nodules"]) == 2
    for a, b in zip(ours["nodules"], theirs["nodules"], strict=True):
        assert set(a) == set(b)
        assert a["label"] == b["label"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
        assert a["prediction"] == b["prediction"]
        assert a["heatmap_files"] == b["heatmap_files"]
        for name in a["heatmap_files"].values():
            assert (out / name).is_file()
    ours_csv = (out / "results.csv").read_text().splitlines()
    theirs_csv = (reference / "results.csv").read_text().splitlines()
    assert ours_csv[0] == theirs_csv[0] and len(ours_csv) == 3
    assert "N-1 suspicious: p=" in done.stdout


def test_batch_prints_no_noise(batch_run):
    """No VTK error or warning lines that make a user think the run failed."""
    _, done = batch_run
    for noise in ("ERR|", "WARN|", "Home directory is not set", "Failed to load presets", "Traceback"):
        assert noise not in done.stderr, done.stderr[-2000:]


def test_batch_runs_in_slicer_without_a_main_window(inputs, tmp_path):
    """The README's command: ``Slicer --no-main-window --python-script`` has no slice or view logics."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("no_main_window.py")), str(SCRIPT),
         "--volume", str(inputs / "ct.nrrd"), "--points", str(inputs / "nodules.mrk.json"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads((out / "results.json").read_text())["nodules"]) == 2
    assert (out / "scene" / "scene.mrml").is_file()
    pngs = sorted(out.glob("0*_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 10_000 for p in pngs)


def test_batch_without_its_packages_says_what_to_install(inputs, tmp_path):
    """Python without site-packages (-S): nothing but the standard library, as in a fresh Slicer."""
    done = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--volume", str(inputs / "ct.nrrd"),
         "--points", str(inputs / "nodules.mrk.json"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("m3net_batch: error: missing Python packages: torch>=2.2, numpy>=1.24")
    assert "safetensors" in line and "slicer-core" in line and "PyTorch extension" in line
    assert not (tmp_path / "out").exists()


def test_batch_saves_a_scene_that_loads_back(batch_run):
    out, _ = batch_run
    scene_file = out / "scene" / "scene.mrml"
    assert scene_file.is_file()
    app = HeadlessApplication.create()
    app.scene.SetURL(str(scene_file))
    assert app.scene.Import()
    volumes = {
        app.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName()
        for i in range(app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
    }
    assert "ct" in volumes
    assert {"M3Net N-1 suspicious heatmap", "M3Net N-2 calcified heatmap macro"} <= volumes
    ct = app.scene.GetFirstNodeByName("ct")
    assert ct.GetImageData() is not None and ct.GetImageData().GetDimensions() == (100, 90, 84)
    table = app.scene.GetFirstNodeByClass("vtkMRMLTableNode")
    assert table is not None and table.GetNumberOfRows() == 2


def test_batch_renders_one_png_per_nodule_with_the_heatmap(batch_run):
    import vtk
    from vtk.util import numpy_support

    out, _ = batch_run
    pngs = sorted(out.glob("0*_*.png"))
    assert [p.name for p in pngs] == ["01_N-1_suspicious.png", "02_N-2_calcified.png"]
    for png in pngs:
        reader = vtk.vtkPNGReader()
        reader.SetFileName(str(png))
        reader.Update()
        width, height, _ = reader.GetOutput().GetDimensions()
        pixels = numpy_support.vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars()).reshape(height, width, -1)
        assert width >= 3 * height  # axial, sagittal, coronal (and 3D when OpenGL is there)
        assert heat_pixels(pixels[..., :3]).sum() > 300


def test_batch_reads_a_ras_csv_like_the_markups_file(batch_run, inputs, tmp_path):
    out, _ = batch_run
    done = batch(
        "--volume",
        inputs / "ct.nrrd",
        "--points",
        inputs / "nodules_ras.csv",
        "--coords",
        "RAS",
        "--out",
        tmp_path,
        "--no-render",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours = json.loads((tmp_path / "results.json").read_text())["nodules"]
    first = json.loads((out / "results.json").read_text())["nodules"]
    assert [n["probability"] for n in ours] == pytest.approx([n["probability"] for n in first], abs=1e-6)
    assert not list(tmp_path.glob("0*_*.png"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--volume": "missing.nrrd"}, "missing.nrrd"),
        ({"--points": "missing.csv"}, "no such points file"),
        ({"--model": "missing.safetensors"}, "missing.safetensors"),
    ],
)
def test_batch_bad_input_exits_2_with_one_line(inputs, tmp_path, change, message):
    args = {"--volume": inputs / "ct.nrrd", "--points": inputs / "nodules.mrk.json", "--out": tmp_path / "out"}
    args.update({k: tmp_path / v for k, v in change.items()})
    done = batch(*[item for pair in args.items() for item in pair], "--no-render")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("m3net_batch: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_batch_point_outside_the_ct_is_refused(inputs, tmp_path):
    (tmp_path / "far.csv").write_text("label,x,y,z\nfar,900,0,0\n")
    done = batch(
        "--volume", inputs / "ct.nrrd", "--points", tmp_path / "far.csv", "--out", tmp_path / "out", "--no-render"
    )
    assert done.returncode == 2
    assert "outside" in done.stderr and "Traceback" not in done.stderr


def test_batch_owns_its_output_folder(inputs, tmp_path):
    """A smaller rerun replaces the earlier set; the user's own files stay; a failed run changes nothing."""
    out = tmp_path / "out"
    common = ("--volume", inputs / "ct.nrrd", "--out", out, "--no-render")
    assert batch(*common, "--points", inputs / "nodules.mrk.json").returncode == 0
    assert list(out.glob("02_*"))
    (out / "notes.txt").write_text("mine")
    (out / "scene" / "my_notes.txt").write_text("mine too")
    first_csv = (inputs / "nodules_ras.csv").read_text().splitlines()
    (tmp_path / "one.csv").write_text("\n".join(first_csv[:2]) + "\n")
    done = batch(*common, "--points", tmp_path / "one.csv", "--coords", "RAS")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(out.glob("02_*")), "the earlier run's second nodule is left beside the new results"
    assert (out / "notes.txt").read_text() == "mine" and (out / "scene" / "my_notes.txt").read_text() == "mine too"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "bad.csv").write_text("\n".join(first_csv[:2]) + "\nfar,900,0,0\n")
    done = batch(*common, "--points", tmp_path / "bad.csv", "--coords", "RAS")
    assert done.returncode == 2 and "far" in done.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_second_run_into_a_busy_folder_is_refused(inputs, tmp_path):
    from m3netcore.outputs import OutputFolder

    out = tmp_path / "out"
    with OutputFolder(out):  # another run holds the folder (this process keeps its lock)
        done = batch("--volume", inputs / "ct.nrrd", "--points", inputs / "nodules.mrk.json", "--out", out,
                     "--no-render")  # fmt: skip
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("m3net_batch: error:")]
    assert str(out) in line and "Traceback" not in done.stderr
    assert not (out / "results.json").exists()


def test_batch_reads_a_luna16_file_of_many_series_for_its_image(small_chest, tmp_path):
    image, nodules = small_chest
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    sitk.WriteImage(image, str(tmp_path / f"{uid}.mhd"))
    rows = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    rows += [f"{uid},{x},{y},{z},8.0" for _, (x, y, z) in nodules]
    rows += ["1.3.6.1.4.1.14519.5.2.1.6279.6001.999,10,10,10,5.0"]
    (tmp_path / "annotations.csv").write_text("\n".join(rows) + "\n")
    done = batch("--volume", tmp_path / f"{uid}.mhd", "--points", tmp_path / "annotations.csv",
                 "--out", tmp_path / "out", "--no-render")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())["nodules"]
    assert len(results) == len(nodules)
    for found, (_, lps) in zip(results, nodules, strict=True):
        assert found["point_lps"] == pytest.approx(list(lps), abs=1e-3)
    # An image file of another name: --series-uid picks the file's rows, as the help says.
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    done = batch("--volume", tmp_path / "ct.nrrd", "--points", tmp_path / "annotations.csv", "--series-uid", uid,
                 "--out", tmp_path / "out2", "--no-render")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads((tmp_path / "out2" / "results.json").read_text())["nodules"]) == len(nodules)
