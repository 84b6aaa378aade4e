"""The Slicer batch script writes the same provenance, report and DICOM results as `m3net predict`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pytest
from dicom_series import NODULES_LPS
from pydicom.sr.codedict import codes

SCRIPT = Path(__file__).resolve().parents[2] / "M3NetSlicer" / "Scripts" / "m3net_batch.py"


@pytest.mark.skipif(importlib.util.find_spec("slicer") is None, reason="needs the slicer-core wheel (make test)")
def test_batch_dicom_and_report_match_predict(dicom_ct, predicted, tmp_path):
    points = tmp_path / "points.csv"
    points.write_text("x,y,z,label\n" + "".join(f"{x},{y},{z},P-{n}\n" for n, (x, y, z) in
                                                enumerate(NODULES_LPS.values(), start=1)))  # fmt: skip
    out = tmp_path / "batch"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--volume", str(dicom_ct.folder), "--points", str(points), "--out", str(out),
         "--device", "cpu", "--no-render", "--report", "--dicom"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ours = json.loads((out / "results.json").read_text())
    theirs = predicted.document
    for key in ("input", "model", "software", "device"):
        assert ours["provenance"][key] == theirs["provenance"][key]
    assert (out / "report.html").is_file() and (out / "01_P-1_overview.png").is_file()
    groups = hd.sr.srread(out / "dicom" / "SR.dcm").content.get_image_measurement_groups()
    probabilities = [g.get_measurements(name=codes.DCM.ProbabilityOfCancer)[0].value for g in groups]
    assert probabilities == pytest.approx([n["probability"] for n in theirs["nodules"]], abs=1e-5)
    assert len(list((out / "dicom").glob("*_heatmap.dcm"))) == 2


def test_batch_refuses_dicom_for_an_image_file(tmp_path):
    image = tmp_path / "ct.nrrd"
    image.write_bytes(b"not read")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--volume", str(image), "--points", str(image), "--out", str(tmp_path / "o"),
         "--dicom"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--dicom needs a DICOM series" in done.stderr and not (tmp_path / "o").exists()
