"""The ``m3net`` command: outputs of ``predict``, ``model-info``, and one clear line per bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m3netcore.cli import EXIT_BAD_INPUT, main

HEATMAP_NAMES = {"micro", "meso", "macro", "combined"}


def test_main_restores_the_warning_display(capsys) -> None:
    before = warnings.showwarning
    assert main(["model-info", "--model", "single-micro", "--json"]) == 0
    assert warnings.showwarning is before


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory, small_ct) -> Path:
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(small_ct, str(path))
    return path


def point_text(point) -> str:
    return ",".join(f"{v:.4f}" for v in point)


def run(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- predict --------------------------------------------------------------------------------


def test_predict_writes_results_and_heatmaps(tmp_path, capsys, ct_path, untrained_model_file, phantom) -> None:
    nodule = phantom.NODULE_LPS
    other = (nodule[0] - 6.0, nodule[1] + 8.0, nodule[2] + 7.0)
    out = tmp_path / "out"

    code, stdout, stderr = run(
        capsys, "predict", ct_path, "--point", point_text(nodule), "--point", point_text(other),
        "--model", untrained_model_file, "--device", "cpu", "--out", out,
    )  # fmt: skip

    assert code == 0, stderr
    assert stderr == ""
    assert "P-1: probability" in stdout and "P-2: probability" in stdout
    document = json.loads((out / "results.json").read_text())
    assert document["coordinate_system"] == "LPS"
    assert len(document["nodules"]) == 2
    entries = zip(document["nodules"], (nodule, other), ("P-1", "P-2"), strict=True)
    for number, (nodule_entry, point, name) in enumerate(entries, start=1):
        assert nodule_entry["point_lps"] == pytest.approx(point, abs=1e-4)
        assert nodule_entry["label"] == name
        assert nodule_entry["prediction"] in {"benign", "malignant"}
        files = nodule_entry["heatmap_files"].values()
        assert all(file_name.startswith(f"{number:02d}_{name}_heatmap_") for file_name in files)
        assert 0.0 <= nodule_entry["probability"] <= 1.0
        assert set(nodule_entry["scale_attention"]) == {"micro", "meso", "macro"}
        assert sum(nodule_entry["scale_attention"].values()) == pytest.approx(1.0, abs=1e-6)
        assert set(nodule_entry["heatmap_files"]) == HEATMAP_NAMES
        for file_name in nodule_entry["heatmap_files"].values():
            heatmap = sitk.ReadImage(str(out / file_name))
            assert heatmap.GetDimension() == 3
            np.testing.assert_allclose(phantom.physical_center(heatmap), point, atol=1e-3)
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"probability", "attention_micro", "attention_meso", "attention_macro"} <= set(rows[0])
    assert [row["label"] for row in rows] == ["P-1", "P-2"]
    assert [row["prediction"] for row in rows] == [n["prediction"] for n in document["nodules"]]
    assert [float(row["probability"]) for row in rows] == pytest.approx(
        [n["probability"] for n in document["nodules"]], abs=1e-4
    )
    written = {"results.json", "results.csv"} | {
        name for n in document["nodules"] for name in n["heatmap_files"].values()
    }
    assert {p.name for p in out.iterdir()} == written | {".m3net-files.json"}  # no lock, no staging left
    assert set(json.loads((out / ".m3net-files.json").read_text())["files"]) == written


def test_predict_reads_ras_markups(tmp_path, capsys, ct_path, untrained_model_file, phantom) -> None:
    x, y, z = phantom.NODULE_LPS
    markups = {
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "RAS",
                "controlPoints": [{"label": "left upper", "position": [-x, -y, z], "positionStatus": "defined"}],
            }
        ]
    }
    points_path = tmp_path / "nodules.mrk.json"
    points_path.write_text(json.dumps(markups))
    out = tmp_path / "out"

    code, stdout, stderr = run(
        capsys, "predict", ct_path, "--points", points_path, "--model", untrained_model_file,
        "--device", "cpu", "--no-explain", "--out", out,
    )  # fmt: skip

    assert code == 0, stderr
    (entry,) = json.loads((out / "results.json").read_text())["nodules"]
    assert entry["label"] == "left upper"
    assert entry["point_lps"] == pytest.approx([x, y, z])
    assert entry["point_ras"] == pytest.approx([-x, -y, z])
    assert entry["heatmap_files"] == {}
    with open(out / "results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["label"] == "left upper"
    assert [float(row[f"{axis}_lps"]) for axis in "xyz"] == pytest.approx([x, y, z], abs=1e-3)
    assert "left upper: probability" in stdout


def test_predict_on_a_non_hu_image_warns_and_succeeds(tmp_path, capsys, untrained_model_file) -> None:
    normalised = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)  # 0..1, not HU
    image = sitk.GetImageFromArray(normalised)
    image.SetSpacing((4.0, 4.0, 4.0))
    path = tmp_path / "normalised.nrrd"
    sitk.WriteImage(image, str(path))

    code, _, stderr = run(
        capsys, "predict", path, "--point", "46,46,46", "--model", untrained_model_file,
        "--device", "cpu", "--no-explain", "--out", tmp_path / "out",
    )  # fmt: skip

    assert code == 0, stderr
    lines = stderr.splitlines()
    assert any(line.startswith("m3net: warning:") and "Hounsfield" in line for line in lines), stderr
    assert not any(line.startswith("m3net: error:") for line in lines)
    assert (tmp_path / "out" / "results.json").is_file()


# --- bad input: exit status 2 and one line -----------------------------------------------------


def write_image(path: Path, image: sitk.Image) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def corrupt_model(path: Path, model_file: Path) -> Path:
    path.write_bytes(model_file.read_bytes()[:1000])
    return path


# A bad-input case makes its arguments from (tmp_path, the CT, a valid model file).
BadInput = Callable[[Path, Path, Path], list]


def image_case(file_name: str, make_image: Callable[[], sitk.Image]) -> BadInput:
    """Arguments that give a valid point and model with a CT file that is not one."""
    return lambda d, ct, m: [write_image(d / file_name, make_image()), "--point", "1,1,0", "--model", m]


# name -> (its arguments, a phrase the one error line must contain).
BAD_INPUTS: dict[str, tuple[BadInput, str]] = {
    "point-outside": (lambda d, ct, m: [ct, "--point", "500,0,0", "--model", m], "outside the image"),
    "2d-image": (image_case("2d.nrrd", lambda: sitk.Image([32, 32], sitk.sitkInt16)), "2D image"),
    "4d-image": (image_case("4d.nrrd", lambda: sitk.Image([8, 8, 8, 3], sitk.sitkInt16)), "4D image"),
    "rgb-image": (image_case("rgb.mha", lambda: sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3)), "RGB"),
    "empty-points-file": (
        lambda d, ct, m: [ct, "--points", write_text(d / "points.csv", ""), "--model", m],
        "no data rows",
    ),
    "malformed-points-file": (
        lambda d, ct, m: [ct, "--points", write_text(d / "points.csv", "x,y,z\n1,abc,3\n"), "--model", m],
        "non-numeric",
    ),
    "invalid-markups-json": (
        lambda d, ct, m: [ct, "--points", write_text(d / "points.mrk.json", '{"markups": ['), "--model", m],
        "not valid JSON",
    ),
    "missing-image": (lambda d, ct, m: [d / "absent.nrrd", "--point", "1,1,1", "--model", m], "no such file"),
    "corrupt-model": (
        lambda d, ct, m: [ct, "--point", "1,1,1", "--model", corrupt_model(d / "corrupt.safetensors", m)],
        "not a readable model file",
    ),
    "missing-model": (lambda d, ct, m: [ct, "--point", "1,1,1", "--model", d / "absent.safetensors"], "no model file"),
    "no-points": (lambda d, ct, m: [ct, "--model", m], "no points"),
    "bad-point-text": (lambda d, ct, m: [ct, "--point", "1,2", "--model", m], "X,Y,Z"),
    "empty-field-in-point": (lambda d, ct, m: [ct, "--point", "1,,2,3", "--model", m], "three numbers X,Y,Z"),
    "non-finite-point": (lambda d, ct, m: [ct, "--point", "nan,1,2", "--model", m], "finite"),
    "series-for-a-file": (lambda d, ct, m: [ct, "--point", "1,1,1", "--series", "1.2.3", "--model", m], "DICOM"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_exit_status_2_and_one_error_line(
    tmp_path, capsys, ct_path, untrained_model_file, case: str
) -> None:
    make_arguments, phrase = BAD_INPUTS[case]
    arguments = make_arguments(tmp_path, ct_path, untrained_model_file)

    code, stdout, stderr = run(capsys, "predict", *arguments, "--device", "cpu", "--out", tmp_path / "out")

    assert code == EXIT_BAD_INPUT == 2
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("m3net: error: ")
    assert phrase in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_cuda_without_a_gpu_gives_one_error_line(tmp_path, capsys, ct_path, untrained_model_file, phantom) -> None:
    code, _, stderr = run(
        capsys, "predict", ct_path, "--point", point_text(phantom.NODULE_LPS), "--model", untrained_model_file,
        "--device", "cuda", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 2
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("m3net: error: ")
    assert "CUDA" in stderr


def test_out_that_is_a_file_gives_one_error_line(tmp_path, capsys, ct_path, untrained_model_file, phantom) -> None:
    out = write_text(tmp_path / "results", "not a folder")
    code, _, stderr = run(
        capsys, "predict", ct_path, "--point", point_text(phantom.NODULE_LPS), "--model", untrained_model_file,
        "--device", "cpu", "--no-explain", "--out", out,
    )  # fmt: skip
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("m3net: error: ")
    assert "is not a folder" in stderr


def test_error_in_a_fresh_process_is_one_line_without_traceback(tmp_path, untrained_model_file) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "m3netcore.cli", "predict", str(tmp_path / "absent.nrrd"),
         "--point", "1,2,3", "--model", str(untrained_model_file), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("m3net: error: ") and "absent.nrrd" in lines[0]
    assert completed.stdout == ""


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    code, stdout, _ = run(capsys)
    assert code == 2
    assert "predict" in stdout and "model-info" in stdout


# --- model-info -------------------------------------------------------------------------------


def test_model_info_of_m3net_is_under_one_gflop(capsys) -> None:
    code, stdout, stderr = run(capsys, "model-info", "--model", "m3net", "--json")

    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["architecture"] == "m3net"
    assert 10_000 < summary["parameters"] < 5_000_000
    assert 0.0 < summary["gflops"] <= 1.0
    assert summary["gmacs"] == pytest.approx(summary["gflops"] / 2)
    assert [spec["scale"] for spec in summary["inputs"]] == ["micro", "meso", "macro"]
    assert [spec["spacing_mm"] for spec in summary["inputs"]] == [[0.75] * 3, [1.5] * 3, [3.0] * 3]


def test_model_info_of_the_authors_resnets_is_heavy(capsys) -> None:
    """DESIGN.md: the authors' fusion model has 99.9 M parameters and 48.4 GFLOPs."""
    code, stdout, stderr = run(capsys, "model-info", "--model", "resnet18x3", "--json")

    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["gflops"] > 40.0
    assert summary["parameters"] == pytest.approx(99e6, rel=0.03)


def test_model_info_reads_a_model_file_and_prints_text(capsys, untrained_model_file) -> None:
    code, stdout, stderr = run(capsys, "model-info", "--model", untrained_model_file)

    assert code == 0, stderr
    assert "architecture m3net" in stdout
    assert "GFLOPs/nodule" in stdout
    assert "input macro   96x96x96 mm on 32x32x32 voxels (3x3x3 mm)" in stdout


def test_model_info_shows_the_model_card(capsys) -> None:
    """The card (data, protocol, held-out results, intended use) is where a user looks for it."""
    code, stdout, stderr = run(capsys, "model-info", "--model", "lidc-phantom")
    assert code == 0, stderr
    assert "# Bundled model `lidc-phantom`" in stdout and "SEMI-SYNTHETIC" in stdout
    code, stdout, stderr = run(capsys, "model-info", "--model", "lidc-phantom", "--json")
    assert code == 0, stderr
    assert "Label protocol: mean-excl3" in json.loads(stdout)["card"]


def test_help_texts_say_what_the_commands_do(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "accuracy" in capsys.readouterr().out  # `benchmark` is not only speed
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--stop-after-epoch" not in capsys.readouterr().out  # a test hook, not a user option


def test_model_info_of_a_corrupt_file_gives_one_error_line(tmp_path, capsys, untrained_model_file) -> None:
    path = corrupt_model(tmp_path / "corrupt.safetensors", untrained_model_file)
    code, _, stderr = run(capsys, "model-info", "--model", path)
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("m3net: error: ")


# --- output folders, failed writes, what users type (issue 13) ---------------------------------


def predict_argv(ct_path, model, out, *points, extra=()) -> list:
    argv = ["predict", ct_path]
    for point in points:
        argv += ["--point", point_text(point)]
    return [*argv, *extra, "--model", model, "--device", "cpu", "--out", out]


def test_a_rerun_with_fewer_points_replaces_the_set_and_keeps_the_users_files(
    tmp_path, capsys, ct_path, untrained_model_file, phantom
) -> None:
    nodule = phantom.NODULE_LPS
    near = [(nodule[0] + d, nodule[1], nodule[2]) for d in (0.0, 3.0, -3.0)]
    out = tmp_path / "out"
    assert run(capsys, *predict_argv(ct_path, untrained_model_file, out, *near))[0] == 0
    assert len(list(out.glob("*_heatmap_*.nrrd"))) == 12
    (out / "my notes.txt").write_text("reader's notes")

    code, _, stderr = run(capsys, *predict_argv(ct_path, untrained_model_file, out, nodule))

    assert code == 0, stderr
    (entry,) = json.loads((out / "results.json").read_text())["nodules"]
    heatmaps = sorted(p.name for p in out.glob("*_heatmap_*.nrrd"))
    assert heatmaps == sorted(entry["heatmap_files"].values())  # no heatmap of the 3-nodule run left
    assert (out / "my notes.txt").read_text() == "reader's notes"


def test_a_second_run_into_a_held_folder_is_refused(tmp_path, capsys, ct_path, untrained_model_file, phantom) -> None:
    from test_outputs import held_by_another_process  # Testing/core is on sys.path (no __init__.py)

    out = tmp_path / "out"
    with held_by_another_process(out) as holder:
        code, stdout, stderr = run(capsys, *predict_argv(ct_path, untrained_model_file, out, phantom.NODULE_LPS))
        assert code == 2 and stdout == ""
        assert stderr.splitlines() == [
            f"m3net: error: {out} is in use by another m3net run (process {holder.pid} on {os.uname().nodename}); "
            "wait for it to finish or choose another output folder"
        ]
        for command in (["train", "--fold", "0"], ["cv"]):  # training runs are refused too, before any work
            code, _, stderr = run(capsys, *command, "--data", tmp_path / "no-cache", "--out", out)
            assert code == 2 and f"{out} is in use by another m3net run" in stderr
    assert sorted(p.name for p in out.iterdir()) == [".m3net-files.json", "from-holder.txt"]  # only the holder's


def test_negative_first_coordinates_are_points_not_options(
    tmp_path, capsys, ct_path, untrained_model_file, phantom
) -> None:
    x, y, z = phantom.NODULE_LPS
    ras = f"{-x},{-y},{z}"  # -12.3,20.7,31.9
    assert ras.startswith("-")
    argv = ["predict", ct_path, "--point", ras, "--coords", "ras", "--no-explain", "--model", untrained_model_file,
            "--device", "cpu", "--out", tmp_path / "out"]  # fmt: skip
    code, stdout, stderr = run(capsys, *argv)
    assert code == 0, stderr
    (entry,) = json.loads((tmp_path / "out" / "results.json").read_text())["nodules"]
    assert entry["point_lps"] == pytest.approx([x, y, z])
    with pytest.raises(SystemExit):  # an option where a point belongs is still an argparse error
        main(["predict", str(ct_path), "--point", "--no-explain", "--out", str(tmp_path / "o")])


def test_a_very_long_label_gives_results_with_a_short_file_name(
    tmp_path, capsys, ct_path, untrained_model_file, phantom
) -> None:
    label = "left upper lobe " * 40  # 640 characters: a file name holds 255 bytes
    points = write_text(tmp_path / "points.csv", "label,x,y,z\n" + f"{label},{point_text(phantom.NODULE_LPS)}\n")
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "predict", ct_path, "--points", points, "--model", untrained_model_file,
                          "--device", "cpu", "--out", out)  # fmt: skip
    assert code == 0, stderr
    (entry,) = json.loads((out / "results.json").read_text())["nodules"]
    assert entry["label"] == label.strip()
    assert all(len(name) < 100 and (out / name).is_file() for name in entry["heatmap_files"].values())


FULL_DISK_RUN = """
import resource, signal, sys
from m3netcore.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""


def run_limited(file_size_limit: int, argv: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FULL_DISK_RUN, str(file_size_limit), *map(str, argv)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_leaves_the_earlier_results_whole_and_says_so_in_one_line(
    tmp_path, capsys, ct_path, untrained_model_file, phantom
) -> None:
    nodule = phantom.NODULE_LPS
    out = tmp_path / "out"
    assert run(capsys, *predict_argv(ct_path, untrained_model_file, out, nodule))[0] == 0
    before = snapshot(out)
    second_point = (nodule[0] + 2.0, nodule[1], nodule[2])

    # every heatmap is larger than 2 kB, so the first one written hits the limit
    failed = run_limited(2000, predict_argv(ct_path, untrained_model_file, out, nodule, second_point))

    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert failed.stderr.startswith(f"m3net: error: {out}/01_P-1_heatmap_")
    assert "could not be written" in failed.stderr or "No space left" in failed.stderr
    assert snapshot(out) == before  # the earlier run's set, byte for byte, and nothing else


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str, *, read_only: bool = False):
    """A real tmpfs (root only); skips where it cannot be mounted."""
    folder.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             check=False) if os.geteuid() == 0 else None  # fmt: skip
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_enospc_on_a_small_tmpfs_is_one_line_and_leaves_nothing(tmp_path, ct_path, untrained_model_file, phantom):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "out"
        many = [(phantom.NODULE_LPS[0] + d, *phantom.NODULE_LPS[1:]) for d in range(-8, 9, 2)]
        failed = run_limited(0, predict_argv(ct_path, untrained_model_file, out, *many))
        assert failed.returncode == 2
        assert len(failed.stderr.splitlines()) == 1 and failed.stderr.startswith(f"m3net: error: {out}/")
        assert "No space left on device" in failed.stderr
        assert list(disk.iterdir()) == []  # not even the folder the run made


def test_a_read_only_folder_is_named_not_a_hidden_file(tmp_path, capsys, ct_path, untrained_model_file, phantom):
    if os.geteuid() == 0:
        context = small_tmpfs(tmp_path / "ro", "64k", read_only=True)
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        context = contextlib.nullcontext(tmp_path / "ro")
    with context as read_only:
        for out in (read_only, read_only / "new"):
            code, _, stderr = run(capsys, *predict_argv(ct_path, untrained_model_file, out, phantom.NODULE_LPS))
            assert code == 2
            assert stderr.splitlines() == [stderr.strip()]
            assert stderr.startswith(f"m3net: error: {read_only}: cannot write into this folder (")
            assert ".m3net" not in stderr and ".partial" not in stderr


def test_results_have_the_permissions_the_umask_gives(tmp_path, capsys, ct_path, untrained_model_file, phantom):
    previous = os.umask(0o027)
    try:
        argv = predict_argv(ct_path, untrained_model_file, tmp_path / "out", phantom.NODULE_LPS)
        code, _, stderr = run(capsys, *argv)
    finally:
        os.umask(previous)
    assert code == 0, stderr
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {0o640}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


MEMORY_RUN = """
import resource, sys
from m3netcore.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def test_memory_does_not_grow_with_the_number_of_points(tmp_path, ct_path, untrained_model_file, phantom) -> None:
    """Chunks hold 16 points; 100 points held together (as before chunking) need ~200 MB more than 8 (2.2 MB each)."""
    peaks = {}
    rng = np.random.default_rng(0)
    for count in (8, 100):
        offsets = rng.uniform(-6.0, 6.0, size=(count, 3))
        points = tmp_path / f"points-{count}.csv"
        points.write_text("x,y,z\n" + "".join(point_text(np.add(phantom.NODULE_LPS, o)) + "\n" for o in offsets))
        completed = subprocess.run(
            [sys.executable, "-c", MEMORY_RUN, "predict", str(ct_path), "--points", str(points),
             "--model", str(untrained_model_file), "--device", "cpu", "--out", str(tmp_path / f"out-{count}")],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        peaks[count] = int(completed.stdout.splitlines()[-1]) / 1024  # MiB
        assert len(list((tmp_path / f"out-{count}").glob("*_heatmap_combined.nrrd"))) == count
    assert peaks[100] - peaks[8] < 80, peaks
