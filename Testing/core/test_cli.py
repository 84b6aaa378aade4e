"""The ``m3net`` command: outputs of ``predict``, ``model-info``, and one clear line per bad input."""

from __future__ import annotations

import csv
import json
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
    written = {p.name for p in out.iterdir()} - {".m3net-files.json"}
    assert written == {"results.json", "results.csv"} | {
        name for n in document["nodules"] for name in n["heatmap_files"].values()
    }


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


def test_model_info_of_a_corrupt_file_gives_one_error_line(tmp_path, capsys, untrained_model_file) -> None:
    path = corrupt_model(tmp_path / "corrupt.safetensors", untrained_model_file)
    code, _, stderr = run(capsys, "model-info", "--model", path)
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("m3net: error: ")
